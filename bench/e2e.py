"""End-to-end: ResNet-50 and a MobileNet-like stack built with each attention module, against the
plain network, for inference (eval, no_grad) and a training step (SGD, cross-entropy on random
labels, random weights).

Providers: `eager` and `compile` build the network from `fastattn.reference.<Class>`; the
fastattn providers from `fastattn.<Class>` (skipped, with the reason, where there is no fast
class yet). The attention overhead is (t_with - t_plain) / t_plain per provider, against the
plain network of the same provider (the eager one for fastattn: without attention modules the
networks are the same).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

import fastattn
import fastattn.reference as ref

from . import harness
from .cases import DTYPES, LAYOUTS, module_kwargs, shape_str
from .micro import DEVICE_REASONS, Provider, Skips, backend_context
from .models import MODELS

E2E_MODULES = ("SqueezeExcite", "ECA", "CBAM", "CoordinateAttention", "SimAM")
MODES = ("inference", "train")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model: str
    batch: int
    resolution: int

    @property
    def shape(self) -> tuple:
        return (self.batch, 3, self.resolution, self.resolution)


def model_configs(device: str, quick: bool) -> list[ModelConfig]:
    """Sizes per device: a 2-core CPU gets small batches and maps (the full CPU run takes about
    15 minutes, mostly compiling); a GPU gets ImageNet-sized ones."""
    if torch.device(device).type == "cuda":
        sizes = ({"resnet50": (32, 224), "mobilenet": (64, 224)} if quick
                 else {"resnet50": (64, 224), "mobilenet": (128, 224)})
    else:
        sizes = ({"resnet50": (2, 64), "mobilenet": (2, 64)} if quick
                 else {"resnet50": (8, 112), "mobilenet": (8, 160)})
    return [ModelConfig(m, *sizes[m]) for m in MODELS]


def attention_factory(name: str, fast: bool) -> Callable[[int], torch.nn.Module]:
    cls = getattr(fastattn if fast else ref, name)

    def make(channels: int) -> torch.nn.Module:
        kwargs = module_kwargs(name, channels, 7, 7)
        if kwargs is None:
            raise LookupError(f"no constructor recipe for {name}: add it to MODULE_KWARGS in bench/cases.py")
        return cls(**kwargs)
    return make


@dataclasses.dataclass
class E2ESettings:
    device: str
    configs: Sequence[ModelConfig]
    attentions: Sequence[str]
    providers: Sequence[Provider]
    dtypes: Sequence[str]
    layouts: Sequence[str]
    modes: Sequence[str]
    budget: harness.Budget


def count(s: E2ESettings) -> int:
    return (len(s.configs) * (1 + len(s.attentions)) * len(s.providers) * len(s.dtypes) * len(s.layouts)
            * len(s.modes))


class E2ERunner:
    def __init__(self, settings: E2ESettings, env: dict, emit: Callable[[dict], None], skips: Skips,
                 progress: Callable[[str, int], None]):
        self.s = settings
        self.env = env
        self.emit = emit
        self.skips = skips
        self.progress = progress
        self.dev = torch.device(settings.device)
        self.timer = harness.Timer(self.dev, settings.budget)

    def run(self) -> None:
        for cfg in self.s.configs:
            for dtype in self.s.dtypes:
                for layout in self.s.layouts:
                    for attn in (None, *self.s.attentions):
                        for provider in self.s.providers:
                            self._variant(cfg, attn, provider, dtype, layout)

    def _variant(self, cfg: ModelConfig, attn: Optional[str], provider: Provider, dtype_name: str, layout: str):
        name = cfg.model if attn is None else f"{cfg.model}+{attn}"
        n_modes = len(self.s.modes)
        why = self._why_not(attn, provider)
        if why:
            if attn is not None:
                self.skips.add(provider.name, name, why)
            self.progress(f"{name} {provider.name}: skipped", n_modes)
            return
        torch.manual_seed(0)
        try:
            factory = attention_factory(attn, provider.is_fast) if attn else None
            model = MODELS[cfg.model](factory).to(self.dev, DTYPES[dtype_name], memory_format=LAYOUTS[layout])
        except Exception as e:  # noqa: BLE001
            self.skips.add(provider.name, name, f"cannot build: {type(e).__name__}: {e}")
            self.progress(f"{name} {provider.name}: skipped", n_modes)
            return
        x = torch.randn(cfg.shape, device=self.dev, dtype=DTYPES[dtype_name]).contiguous(memory_format=LAYOUTS[layout])
        y = torch.randint(0, 1000, (cfg.batch,), device=self.dev)
        if provider.name == "compile":
            torch._dynamo.reset()
        net = torch.compile(model, dynamic=False) if provider.name == "compile" else model
        with backend_context(provider):
            for mode in self.s.modes:
                self._measure(cfg, name, provider, mode, dtype_name, layout, model, net, x, y)
        del model, net
        if self.dev.type == "cuda":
            torch.cuda.empty_cache()

    def _why_not(self, attn: Optional[str], provider: Provider) -> str:
        if not provider.is_fast:
            return ""
        if attn is None:
            return "the plain network has no attention module: the eager one is the baseline"
        if attn not in fastattn.FAST_MODULES:
            return f"no fastattn.{attn} yet (not in fastattn.FAST_MODULES)"
        check = DEVICE_REASONS.get(provider.backend)
        return (check(torch.empty(0, device=self.dev)) or "") if check else ""

    def _measure(self, cfg, name, provider, mode, dtype_name, layout, model, net, x, y) -> None:
        label = f"{name} {provider.name} {mode} {dtype_name} {layout} {shape_str(cfg.shape)}"
        train = mode == "train"
        model.train(train)
        if train:
            opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

            def call(k):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(net(x).float(), y).backward()
                opt.step()
        else:
            def call(k):
                with torch.no_grad():
                    net(x)
        try:
            call(0)                                   # trial (compiles, for `compile`)
            stats = self.timer(call, 1)
            if self.dev.type == "cuda":
                peak = harness.cuda_peak_bytes(lambda: call(0), self.dev) / harness.MiB
            else:
                peak = harness.saved_bytes(lambda: net(x)) / harness.MiB if train else None
        except Exception as e:  # noqa: BLE001
            self.skips.add(provider.name, name, f"{mode} failed: {type(e).__name__}: {e}")
            self.progress(f"{label}: failed", 1)
            return
        self.emit(dict(kind="model", name=name, provider=provider.name, mode=mode, dtype=dtype_name, layout=layout,
                       shape=shape_str(cfg.shape), median_ms=stats.median_ms, p20_ms=stats.p20_ms,
                       p80_ms=stats.p80_ms, gbps=None, pct_roofline=None, peak_mb=peak, **self.env))
        self.progress(f"{label}: {stats.median_ms:.1f} ms ({cfg.batch / stats.median_ms * 1e3:.1f} img/s)", 1)
