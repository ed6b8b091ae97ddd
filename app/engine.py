"""The studio's model holder: weights, tokenizer, sampler, device and one lock. No gradio here.

One ``Engine`` serves every session. The weights load once, lazily (first use, or an explicit
``load()`` from the launcher), never at import, and only from the paths given at start-up (or
the ``checkpoints/`` folder): no request can name a file. Loaded weights live in the process's
own memory, so the files may be deleted or replaced while the studio runs; ``reload()`` re-reads
them and keeps the old weights when that fails. Model calls are serialised by a lock taken per
step, not per run: the sampler keeps all run state in its own canvas, so two streams may
interleave step by step, and an abandoned stream can never hold the lock forever.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from app.batching import BatchScheduler
from app.render import display_scale, paint_empty_cells, upscale
from scan_core import (
    CheckpointError,
    SamplerSettings,
    ScanSampler,
    Trace,
    Transformer,
    VQModel,
    choose_dtype,
    inspect,
    load_pair,
    model_preset,
    pair_mismatch,
    vq_preset,
)
from scan_core.images import center_crop_adm, pil_to_tensor, tensor_to_uint8
from scan_core.sampling.settings import recommended_settings

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT_DIR = ROOT / "checkpoints"
CLASS_NAMES_FILE = ROOT / "assets" / "class_names.json"
# Names for any 1,000-class model (RandAR, LlamaGen, SCAN on ImageNet) whose card has none.
IMAGENET_CLASS_NAMES_FILE = ROOT / "assets" / "imagenet_class_names.json"
IMAGENET_CLASSES = 1000
DEMO_NOTE = "untrained demo weights: the embedded default model has not been trained yet"
DEMO_SEED = 1234
DISPLAY_SIZE = 256  # decoded images are upscaled (NEAREST, integer factor) to at least this
DECODE_CACHE = 64  # decoded frames kept; scrubbing back and forth should not re-run the decoder
DECODE_CHUNK = 16  # images decoded per forward when a whole timeline is exported
# The sampler settings the studio shows, in this order; its API takes them by these names (or in
# this order after an endpoint's own inputs). The others keep the model card's values.
STUDIO_SETTINGS = (
    "cfg_scale",
    "temperature",
    "top_k",
    "top_p",
    "num_steps",
    "num_rounds",
    "tokens_per_round",
    "scorer",  # the page offers "head" only for a model with a trained quality head (app.ui)
)


@dataclass
class Bundle:
    """Everything loaded: the networks and what the UI must say about them."""

    model: Transformer
    tokenizer: VQModel
    model_id: str
    class_names: list[str]
    notes: list[str] = field(default_factory=list)
    sources: tuple[str, str] | None = None  # the checkpoint files, for reload(); None: in memory
    card: dict | None = None  # the model card stored in the checkpoint (settings, metrics)


def pick_device(device: str | None = None) -> torch.device:
    """The requested device, else CUDA when present, else CPU (never a hard-coded ``cuda``)."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def demo_modules(seed: int = DEMO_SEED) -> tuple[Transformer, VQModel]:
    """SCAN-S + VQ-S with random weights from a fixed seed (the stand-in default model).

    The output heads get small random weights instead of the usual zeros, so the demo shows
    varied token choices and a non-flat quality heatmap; the global RNG is left untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Transformer(
            model_preset("SCAN-S", token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0)
        )
        with torch.no_grad():
            model.output.weight.normal_(0.0, 0.05)
            model.dis_output.weight.normal_(0.0, 0.1)
        tokenizer = VQModel(vq_preset("VQ-S"))
    return model.eval().requires_grad_(False), tokenizer.eval().requires_grad_(False)


def read_class_names(path: Path, count: int) -> tuple[list[str], list[str]]:
    """Class names from a JSON list (or {"class_names": [...]}) if it fits, else "class i"."""
    fallback = [f"class {i}" for i in range(count)]
    if not path.is_file():
        return fallback, []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return fallback, [f"class names not read from {path.name}: {error}"]
    names = data.get("class_names") if isinstance(data, dict) else data
    if not isinstance(names, list) or len(names) != count:
        return fallback, [f"{path.name} does not list {count} class names; using numbers"]
    return [str(name) for name in names], []


def class_names_for(
    path: Path, count: int, imagenet_path: Path = IMAGENET_CLASS_NAMES_FILE
) -> tuple[list[str], list[str]]:
    """The names in ``path`` when it lists ``count``; else, for a 1,000-class model, the
    ImageNet-1k names (``imagenet_path``); else "class i", with a note saying why."""
    names, notes = read_class_names(path, count)
    if count == IMAGENET_CLASSES and names == [f"class {i}" for i in range(count)]:
        imagenet, imagenet_notes = read_class_names(imagenet_path, count)
        if imagenet != names:
            return imagenet, []
        notes += imagenet_notes
    return names, notes


def _own_memory(module: torch.nn.Module) -> torch.nn.Module:
    """Copy weights out of the checkpoint file's memory map into private memory.

    Loaders map the file (cheap, lazy). A long-running server must not depend on it: a file
    replaced in place (``cp new.safetensors old.safetensors``) would silently change the weights,
    and one truncated while mapped kills the process with SIGBUS on the next forward.
    """
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            tensor.data = tensor.data.clone()
    return module


def _require_finite(module: torch.nn.Module, path: str) -> None:
    """Refuse weights holding NaN or inf: a file corrupted in place (bytes overwritten, a copy
    padded out) still parses, and would only fail later, inside every session's sampler."""
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise CheckpointError(
                    f"{path} holds NaN or infinite values in {name}: the "
                    "file is corrupted; re-download or re-export it"
                )


def _find_checkpoints(directory: Path) -> tuple[Path | None, Path | None]:
    """The first model and tokenizer files in ``directory``, told apart by their headers."""
    found: dict[str, Path] = {}
    for path in sorted(directory.glob("*.safetensors")) if directory.is_dir() else []:
        try:
            kind = inspect(path).kind
        except CheckpointError:
            continue
        found.setdefault(kind, path)
    return found.get("model"), found.get("tokenizer")


class Engine:
    """Holds the model, tokenizer and sampler for all sessions; see the module docstring."""

    def __init__(
        self,
        model_path: str | None = None,
        tokenizer_path: str | None = None,
        device: str | None = None,
        checkpoint_dir: Path = CHECKPOINT_DIR,
        class_names_path: Path = CLASS_NAMES_FILE,
        trust_pickle: bool = False,
        dtype: str = "float32",
    ) -> None:
        """``trust_pickle`` lets ``.pt`` files run pickled code (``--trust-pickle``); without it
        they load with ``weights_only=True`` and anything beyond tensors is refused. ``dtype``:
        the model's precision, "auto", "float32" or "bfloat16" (``scan_core.choose_dtype``;
        app.py passes its ``--dtype``, auto by default). ValueError for any other name."""
        self.device = pick_device(device)
        self.dtype, self.precision = choose_dtype(dtype, self.device)  # precision: why, in words
        self.trust_pickle = trust_pickle
        self._paths = (model_path, tokenizer_path)
        self._checkpoint_dir = Path(checkpoint_dir)
        self._class_names_path = Path(class_names_path)
        self._lock = threading.RLock()
        self._bundle: Bundle | None = None
        self._sampler: ScanSampler | None = None
        self._frames: OrderedDict[bytes, np.ndarray] = OrderedDict()
        # Batches sessions' model work under this lock (app.batching); nothing runs until used.
        self.scheduler = BatchScheduler(lambda: self.sampler, self._lock)
        # On: batched=True calls share runs (app.py turns it on, except on ZeroGPU, where each
        # call is a process of its own). Off: every run alone, one at a time.
        self.batching = False

    @classmethod
    def from_modules(
        cls,
        model: Transformer,
        tokenizer: VQModel,
        model_id: str = "custom",
        class_names: list[str] | None = None,
        notes: list[str] | None = None,
        device: str | None = "cpu",
        dtype: str = "float32",
    ) -> Engine:
        """An engine around modules already built (tests, notebooks); nothing is read from disk."""
        engine = cls(device=device, dtype=dtype)
        names = class_names or [f"class {i}" for i in range(model.config.num_classes)]
        engine._install(Bundle(model, tokenizer, model_id, names, list(notes or [])))
        return engine

    # -- loading -----------------------------------------------------------------------------

    def load(self) -> Bundle:
        """Load the weights once (thread-safe); later calls return the same bundle."""
        if self._bundle is None:
            with self._lock:
                if self._bundle is None:
                    self._install(self._load_bundle())
        return self._bundle

    def reload(self) -> str:
        """Re-read the checkpoint files loaded at start-up (after an operator replaced them).

        Returns a one-line report. When a file is gone or broken, the weights already loaded
        keep serving and the report says so; nothing else changes.
        """
        current = self.load()
        if current.sources is None:
            return f"nothing to reload: {current.model_id} was not read from checkpoint files"
        try:
            bundle = self._load_files(*current.sources)
        except (CheckpointError, OSError) as error:  # OSError: unreadable (EACCES, EIO, ...)
            return f"reload failed ({error}); still serving the weights loaded before"
        configs = (bundle.model.config, bundle.tokenizer.config)
        if configs != (current.model.config, current.tokenizer.config):
            return (
                "reload refused: the files now hold a different model (sessions' traces and "
                "the page were built for the old one); restart the studio to switch"
            )
        with self._lock:
            self._install(bundle)
            self._frames.clear()
        return f"reloaded {bundle.model_id} from {', '.join(map(str, bundle.sources))}"

    def _install(self, bundle: Bundle) -> None:
        model_cfg, vq_cfg = bundle.model.config, bundle.tokenizer.config
        mismatch = pair_mismatch(model_cfg, vq_cfg)
        if mismatch:
            raise CheckpointError(mismatch)
        if not getattr(bundle.model, "quality_head_trained", model_cfg.has_quality_head):
            bundle.notes.append("this model has no quality head: cells are scored by confidence")
        # The tokenizer stays in float32: it runs once per frame, and its codebook lookup
        # decides codes by distances that bfloat16 would blur.
        bundle.model.to(self.device, self.dtype).eval()
        bundle.tokenizer.to(self.device).eval()
        self._sampler = ScanSampler(bundle.model, bundle.model_id, self.device)
        self._bundle = bundle

    def _load_bundle(self) -> Bundle:
        model_path, tokenizer_path = self._paths
        notes: list[str] = []
        if model_path or tokenizer_path:
            try:
                return self._load_files(model_path, tokenizer_path)
            except CheckpointError as error:
                # Hub ids fail when offline or without huggingface_hub: fall back and say so.
                # A local path that fails is the user's mistake and must stop the launch.
                if not any(str(p or "").startswith("hf://") for p in self._paths):
                    raise
                notes.append(
                    f"could not load the requested weights ({error}); "
                    "showing the embedded default instead"
                )
        found_model, found_tokenizer = _find_checkpoints(self._checkpoint_dir)
        if found_model and found_tokenizer:
            bundle = self._load_files(str(found_model), str(found_tokenizer))
            bundle.notes[:0] = notes
            return bundle
        model, tokenizer = demo_modules()
        names, name_notes = class_names_for(self._class_names_path, model.config.num_classes)
        notes += [DEMO_NOTE, *name_notes]
        return Bundle(model, tokenizer, "demo-random-SCAN-S", names, notes)

    def _load_files(self, model_path: str | None, tokenizer_path: str | None) -> Bundle:
        if not (model_path and tokenizer_path):
            raise CheckpointError("pass both a model (--model) and a tokenizer (--tokenizer)")
        trust = self.trust_pickle
        # The tokenizer decides the grid of a model file that does not store one (RandAR).
        model, tokenizer, report = load_pair(
            model_path, tokenizer_path, device="cpu", trust_pickle=trust
        )
        model, tokenizer = _own_memory(model), _own_memory(tokenizer)
        _require_finite(model, model_path)
        _require_finite(tokenizer, tokenizer_path)
        names, notes = class_names_for(self._class_names_path, model.config.num_classes)
        card_names = (report.card or {}).get("class_names")
        if isinstance(card_names, list) and len(card_names) == model.config.num_classes:
            names, notes = [str(n) for n in card_names], []
        model_id = report.preset or Path(model_path).stem
        sources = (model_path, tokenizer_path)
        return Bundle(
            model, tokenizer, model_id, names, [*report.notes, *notes], sources, report.card
        )

    # -- facts the UI needs ------------------------------------------------------------------

    @property
    def bundle(self) -> Bundle:
        return self.load()

    @property
    def sampler(self) -> ScanSampler:
        self.load()
        return self._sampler

    @property
    def grid_size(self) -> int:
        return self.bundle.model.config.grid_size

    @property
    def num_tokens(self) -> int:
        return self.grid_size * self.grid_size

    @property
    def image_size(self) -> int:
        return self.bundle.tokenizer.config.image_size

    @property
    def display_scale(self) -> int:
        return display_scale(self.image_size, DISPLAY_SIZE)

    @property
    def auto_scorer(self) -> str:
        """What scorer "auto" means for the loaded model (the sampler decides)."""
        return self.sampler.resolve(self.default_settings().replace(scorer="auto")).scorer

    def default_settings(self) -> SamplerSettings:
        """The model card's measured settings, else the paper's scaled to this grid."""
        return recommended_settings(self.bundle.card, self.num_tokens)

    def class_id(self, name: str | int) -> int:
        """A class id from its display name (or an id given as a number / numeric string)."""
        names = self.bundle.class_names
        if isinstance(name, str) and name in names:
            return names.index(name)
        try:
            index = int(name)
        except (TypeError, ValueError, OverflowError):
            shown = repr(name) if len(repr(name)) <= 40 else f"{repr(name)[:37]}..."
            raise ValueError(f"unknown class {shown}; pick one from the list") from None
        if not 0 <= index < len(names):
            raise ValueError(f"class id {index} out of range [0, {len(names) - 1}]")
        return index

    # -- model work (each step under the lock) -----------------------------------------------

    def _locked(self, start: Callable[[], Iterator]) -> Iterator:
        stream = start()  # a generator: settings are validated on the first step, under the lock
        while True:
            with self._lock:
                item = next(stream, None)
            if item is None:
                return
            yield item

    def _run(self, operation: str, *arguments, batched: bool) -> Iterator:
        """The sampler's ``operation`` stream, each step under the lock; with ``batched`` (and
        ``self.batching``) through the scheduler, maybe sharing a run with other sessions."""
        if batched and self.batching:
            return getattr(self.scheduler, operation)(*arguments)
        sampler = self.sampler
        return self._locked(lambda: getattr(sampler, operation)(*arguments))

    def generate(self, class_ids, settings, seed, locked=None, batched=False) -> Iterator:
        return self._run("generate", class_ids, settings, seed, locked, batched=batched)

    def refine(self, trace, settings, seed, locked=None, region=None, batched=False) -> Iterator:
        return self._run("refine", trace, settings, seed, locked, region, batched=batched)

    def regenerate_region(
        self, trace, region, settings, seed, locked=None, refine_inside=False, batched=False
    ) -> Iterator:
        arguments = (trace, region, settings, seed, locked, refine_inside)
        return self._run("regenerate_region", *arguments, batched=batched)

    def score(self, codes: np.ndarray, class_ids, settings, seed: int = 0) -> Trace:
        with self._lock:
            return self.sampler.score(codes, class_ids, settings, seed)

    def encode(self, image: Image.Image) -> np.ndarray:
        """Any RGB image -> ADM centre crop at the tokenizer's size -> codes (1, N)."""
        crop = center_crop_adm(image, self.image_size)
        with self._lock, torch.inference_mode():
            codes = self.bundle.tokenizer.encode(pil_to_tensor(crop).to(self.device))
        return codes.reshape(1, -1).cpu().numpy()

    def decode(self, codes: np.ndarray, display: bool = True) -> np.ndarray:
        """Codes (B, N) (-1 = empty) -> uint8 (B, H, W, 3), upscaled for display when asked.

        Empty cells are decoded as code 0 and then painted over, so a half-built image shows
        exactly which patches exist. Recent frames are cached by their codes.
        """
        codes = np.asarray(codes, dtype=np.int64).reshape(-1, self.num_tokens)
        out = [self._frames.get(row.tobytes()) for row in codes]
        missing = [i for i, frame in enumerate(out) if frame is None]
        for start in range(0, len(missing), DECODE_CHUNK):
            chunk = missing[start : start + DECODE_CHUNK]
            for i, frame in zip(chunk, self._decode_rows(codes[chunk]), strict=True):
                out[i] = frame
                self._remember(codes[i].tobytes(), frame)
        images = np.stack(out)
        if display:
            images = np.stack([upscale(image, self.display_scale) for image in images])
        return images

    def _decode_rows(self, codes: np.ndarray) -> np.ndarray:
        known = codes >= 0
        with self._lock, torch.inference_mode():
            tensor = torch.as_tensor(np.where(known, codes, 0), device=self.device)
            pixels = tensor_to_uint8(self.bundle.tokenizer.decode_codes(tensor))
        rows = zip(pixels, known, strict=True)
        return np.stack([paint_empty_cells(p, k, self.grid_size) for p, k in rows])

    def _remember(self, key: bytes, frame: np.ndarray) -> None:
        with self._lock:
            self._frames[key] = frame
            while len(self._frames) > DECODE_CACHE:
                self._frames.popitem(last=False)
