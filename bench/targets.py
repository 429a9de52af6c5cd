"""Edge targets the profiler runs on (registry; entry-point group ``edgepro_bench.targets``).

A target sets up the runtime (threads, environment) and turns an artifact into the callable that is timed: the
protector's own authorized inference path on that runtime. The profiler runs each target in a child process, so
thread settings and environment variables (``OPENSSL_ia32cap`` for software AES) apply to it alone.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, ClassVar

import numpy as np
import torch

from protectors.core.artifact import Artifact
from protectors.core.base import ModelFactory, Protector
from protectors.core.errors import NotApplicable
from protectors.core.registry import Registry

#: OpenSSL capability mask clearing AES-NI and PCLMULQDQ (leaf 1 ECX bits 25 and 1) and VAES/VPCLMULQDQ (leaf 7
#: ECX bits 9 and 10): OpenSSL, including the copy inside ``cryptography``, falls back to software AES-GCM.
SOFT_AES_MASK = "~0x200000200000000:~0x60000000000"


class Target:
    """Base class of edge targets."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    threads: ClassVar[int | None] = 1
    env: ClassVar[dict[str, str]] = {}
    #: whether this target runs ONNX files (which the profiler then builds ahead of time)
    needs_onnx: ClassVar[bool] = False

    def unavailable(self) -> str | None:
        """Why this target cannot run on this machine, or ``None``."""
        return None

    def setup(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)

    def example(self, x: torch.Tensor) -> Any:
        return x

    def prepare(self, protector: Protector, artifact: Artifact, key: bytes, factory: ModelFactory, mode: str,
                calib: torch.Tensor) -> None:
        """Untimed work before the cold start, done where the model is provisioned (e.g. quantizing on ``calib``,
        the device's calibration inputs); default nothing."""

    def load(self, protector: Protector, artifact: Artifact, key: bytes, factory: ModelFactory,
             mode: str) -> Callable[[Any], Any]:
        raise NotImplementedError


targets: Registry[type[Target]] = Registry("target", "edgepro_bench.targets", Target)


@targets.register()
class TorchCpu1t(Target):
    name = "torch-cpu-1t"
    description = "eager PyTorch, one intra-op thread (a single-core edge CPU)"
    device = "cpu"

    def load(self, protector, artifact, key, factory, mode):
        model = protector.deploy(artifact, key, factory, mode).to(self.device)

        def run(x):
            with torch.inference_mode():
                return model(x)

        return run


@targets.register()
class TorchCpu(TorchCpu1t):
    name = "torch-cpu"
    description = "eager PyTorch, all cores"
    threads = None

    def setup(self) -> None:
        torch.set_num_threads(os.cpu_count() or 1)


@targets.register()
class TorchCpu1tSoftAes(TorchCpu1t):
    name = "torch-cpu-1t-soft-aes"
    description = "one thread, OpenSSL without AES-NI/CLMUL (as on a Raspberry Pi 4 or MCU-class core)"
    env = {"OPENSSL_ia32cap": SOFT_AES_MASK}


@targets.register()
class Cuda(TorchCpu1t):
    name = "cuda"
    description = "PyTorch on the first CUDA GPU"
    device = "cuda"

    def unavailable(self):
        return None if torch.cuda.is_available() else "skipped: no CUDA device on this machine"

    def example(self, x):
        return x.to("cuda")

    def load(self, protector, artifact, key, factory, mode):
        if mode in protector.host_memory_modes:
            raise NotImplementedError(f"n/a: {protector.name} {mode} keeps its weights in host memory")
        inner = super().load(protector, artifact, key, factory, mode)

        def run(x):
            out = inner(x)
            torch.cuda.synchronize()
            return out

        return run


@targets.register()
class OnnxRuntimeCpu1t(Target):
    name = "onnxruntime-cpu-1t"
    description = "ONNX Runtime CPU execution provider, one intra-op thread"
    needs_onnx = True

    def unavailable(self):
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return "skipped: onnxruntime is not installed"
        return None

    def example(self, x):
        return np.ascontiguousarray(x.numpy())

    def load(self, protector, artifact, key, factory, mode):
        protector.open(artifact, key)  # no metadata field is acted on before authentication
        why = artifact.meta.get("onnx_unsupported")  # onnx_build said so when the deployment was built
        if why:
            raise NotImplementedError(why if why.startswith("n/a") else f"n/a: {why}")
        try:
            return protector.onnx_load(artifact, key, mode, threads=1)
        except NotApplicable as exc:
            raise NotImplementedError(str(exc)) from None


@targets.register()
class OnnxRuntimeInt8_1t(OnnxRuntimeCpu1t):
    name = "onnxruntime-int8-1t"
    description = ("ONNX Runtime CPU, one thread, each deployment's graph statically quantized to int8 (QDQ) on the "
                   "device's calibration data, secrets applied while calibrating")

    quant = None

    def prepare(self, protector, artifact, key, factory, mode, calib):
        from .quantize import OrtInt8

        if self.quant is None:
            self.quant = OrtInt8(calib)
        with contextlib.suppress(NotImplementedError):  # load says why again, in the record
            self.load(protector, artifact, key, factory, mode)  # quantizes once: the timed load finds it done

    def load(self, protector, artifact, key, factory, mode):
        from .quantize import ort_int8_runner

        if self.quant is None:
            raise RuntimeError("onnxruntime-int8-1t: prepare() must run before load()")
        try:
            return ort_int8_runner(lambda: super(OnnxRuntimeInt8_1t, self).load(protector, artifact, key, factory,
                                                                                mode), self.quant)
        except NotApplicable as exc:
            raise NotImplementedError(str(exc)) from None


@targets.register()
class TorchInt8_1t(TorchCpu1t):
    name = "torch-int8-1t"
    description = ("eager PyTorch, one thread, the deployed module quantized to int8 with FX graph mode (x86); its "
                   "cold start includes the quantization")

    calib = None

    def prepare(self, protector, artifact, key, factory, mode, calib):
        self.calib = calib

    def load(self, protector, artifact, key, factory, mode):
        from .quantize import torch_int8

        if mode in protector.host_memory_modes:
            raise NotImplementedError(f"n/a: {protector.name} {mode} decrypts float weights per inference; an int8 "
                                      "form would need its int8 weights encrypted")
        model = protector.deploy(artifact, key, factory, mode)
        packages = ("protectors", type(protector).__module__.split(".")[0])
        try:
            model = torch_int8(model, self.calib, packages)
        except NotApplicable as exc:
            raise NotImplementedError(str(exc)) from None

        def run(x):
            with torch.inference_mode():
                return model(x)

        return run
