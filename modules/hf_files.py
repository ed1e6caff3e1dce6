"""HuggingFace model directories, read and written: what both halves of `polyhead convert` share.

Reading: a local directory, or a hub name fetched with huggingface_hub (`locate`), holding what
`save_pretrained` writes: config.json (`read_json`), the weights (`read_weights`: model.safetensors
or pytorch_model.bin, or a sharded index of either) and the tokenizer (`read_tokenizer`: BERT,
GPT-2, LLaMA, Qwen: tokenizer.json; T5: spiece.model, else tokenizer.json). Writing: `create_atomically`,
and `Conversion`, the report of what was done.

Import is modules/hf_import.py (`import_hf`), export modules/hf_export.py (`export_hf`).
Every problem with the user's files is a UserError naming the file and the fix, raised before
anything is written; outputs appear whole or not at all (temporary name, then os.replace).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import safetensors.torch
import torch
from torch import Tensor

from datamodules.tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer
from modules.atomic_write import current_umask
from modules.checkpoint import code_the_pickle_wants
from modules.convert import StateDict
from modules.errors import UserError, one_line
from modules.network import hub_offline

HUB_TEXT_FILES = [
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "spiece.model",
]
HUB_WEIGHT_FILES = (
    ["model.safetensors", "model.safetensors.index.json", "model-*.safetensors"],
    ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin"],
)
"""What a hub download fetches: the text files, and safetensors weights, or torch's where a repo
has no safetensors (never both, nor TF / Flax / ONNX copies)."""
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
HF_TOKEN_KEYS = {
    "pad": "pad_token",
    "unk": "unk_token",
    "eos": "eos_token",
    "cls": "cls_token",
    "sep": "sep_token",
    "mask": "mask_token",
    "bos": "bos_token",
}
"""Our special-token roles -> the keys of HF's tokenizer_config.json ("start" has none: T5 names it
in config.json as decoder_start_token_id)."""
BERT_TOKENS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
T5_TOKENS = {"pad": "<pad>", "eos": "</s>", "unk": "<unk>"}
GPT2_TOKENS = {"eos": "<|endoftext|>", "unk": "<|endoftext|>"}
"""GPT-2 has no pad token, nor does LLaMA: their eos pads (HF's usual `tokenizer.pad_token =
tokenizer.eos_token`): padded positions are masked out of attention and of the loss, so the id they
hold never counts."""


T5_EXTRA_IDS = 100  # transformers' T5Tokenizer default, when tokenizer_config.json does not say
FIX = "pass the directory that save_pretrained wrote (config.json, weights, tokenizer files)"


@dataclass
class Conversion:
    """What a conversion read and wrote, for the command's report."""

    model_type: str  # "bert", "t5", "gpt2", "llama", "mistral", "qwen2" or "qwen3" (hf_import.py FAMILIES)
    architecture: str  # the HF class whose weights were read or written
    source: str
    written: Path
    parameters: int
    embedding_rows: int
    tokenizer: Tokenizer
    tasks: dict[str, str]  # polyhead task name -> class name
    files: list[str]  # what an export wrote in its directory
    base: str | None = None  # the HF model an exported adapter goes on


# ---------------------------------------------------------------------------------------- reading


def locate(source: str) -> Path:
    """A local model directory, or a hub name fetched into the HF cache. Offline (HF_HUB_OFFLINE=1,
    or no network), a name not in the cache fails at once with one message."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise UserError(f"{source}: is a file, not a model directory; {FIX}")
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", source):
        raise UserError(f"{source}: no such directory; {FIX}")
    from huggingface_hub import snapshot_download  # only a hub name needs it
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    offline = hub_offline()  # probes the hub once; unreachable, only the local HF cache is asked
    try:
        for weights in HUB_WEIGHT_FILES:
            directory = Path(
                snapshot_download(source, allow_patterns=HUB_TEXT_FILES + weights, etag_timeout=10)
            )
            if any((directory / name).is_file() for name in WEIGHT_FILES):
                break
        return directory
    except Exception as error:
        if offline:
            reason = "offline (HF_HUB_OFFLINE, or the hub did not answer) and it is not in the local HF cache"
        elif isinstance(error, GatedRepoError):
            reason = "the model is gated: accept its terms on the hub and log in (hf auth login)"
        elif isinstance(error, RepositoryNotFoundError):
            reason = "no such model on the hub (or it is private)"
        else:
            reason = f"the hub is unreachable ({type(error).__name__})"
        raise UserError(
            f"{source}: no such local directory, and the HuggingFace hub could not provide it: {reason}; "
            "pass the path of a local model directory (config.json, weights, tokenizer files)"
        ) from None


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: not a readable JSON file ({error})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object")
    return value


def _load_weight_file(path: Path) -> StateDict:
    try:
        if path.suffix == ".safetensors":
            return safetensors.torch.load_file(path, device="cpu")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        wanted = code_the_pickle_wants(error)
        if wanted:
            raise UserError(
                f"{path}: refused: loading it would run code ({wanted}), which model weights never need; "
                "nothing from it was run. Save the model with safetensors (save_pretrained's default) and convert that"
            ) from None
        reason = one_line(str(error))[:160] or type(error).__name__
        raise UserError(
            f"{path}: not a readable weights file ({reason}); it may be truncated: save or download it again"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(f"{path}: does not hold a state dict of tensors")
    return state


def read_weights(directory: Path) -> tuple[StateDict, Path]:
    """-> (the HF state dict, the file it came from): safetensors first, then a torch pickle
    (read with weights_only, so no code runs); a sharded index loads every shard it names."""
    for name in WEIGHT_FILES:
        path = directory / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return _load_weight_file(path), path
        shards = sorted(set(read_json(path).get("weight_map", {}).values()))
        if not shards:
            raise UserError(f"{path}: its weight_map names no shard files")
        state: StateDict = {}
        for shard in shards:
            if not (directory / shard).is_file():
                raise UserError(f"{path}: names {shard}, which is not in {directory}; download every shard")
            state |= _load_weight_file(directory / shard)
        return state, path
    raise UserError(f"{directory}: no weights (model.safetensors or pytorch_model.bin); {FIX}")


def _tokenizer_settings(directory: Path) -> dict:
    """special_tokens_map.json and tokenizer_config.json merged (either may be absent)."""
    settings: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (directory / name).is_file():
            settings |= read_json(directory / name)
    return settings


def _token_names(settings: dict) -> dict[str, str]:
    """Role -> token text, from HF's tokenizer settings (older files write a token as {"content": ...}).
    Not bos: whether a text begins with one is what the tokenizer does (`HFTokenizer.leading_special`),
    not what its settings name (GPT-2 names a bos_token it never adds)."""
    names = {}
    for role, key in HF_TOKEN_KEYS.items():
        if role == "bos":
            continue
        value = settings.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            names[role] = value
    return names


def read_tokenizer(directory: Path, model_type: str, hf_config: SimpleNamespace) -> Tokenizer:
    """The model's own tokenizer with its special tokens by role (see datamodules/tokenizer.py)."""
    settings = _tokenizer_settings(directory)
    names = _token_names(settings)
    json_file, spiece = directory / "tokenizer.json", directory / "spiece.model"
    if model_type != "t5":
        if not json_file.is_file():
            raise UserError(
                f"{directory}: no tokenizer.json, which polyhead reads this {model_type} model's vocabulary "
                "from; write one with transformers: AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)"
            )
        text = json_file.read_text(encoding="utf-8")
        if model_type == "bert":
            return _checked_tokenizer(json_file, lambda: HFTokenizer(text, BERT_TOKENS | names))
        special = (GPT2_TOKENS if model_type == "gpt2" else {}) | names
        if "eos" not in special:
            raise UserError(
                f"{directory}: tokenizer_config.json names no eos_token, which ends every prompt and "
                "summary; add the model's end-of-text token as eos_token"
            )
        special.setdefault("pad", special["eos"])
        tokenizer = _checked_tokenizer(json_file, lambda: HFTokenizer(text, special))
        lead = tokenizer.leading_special()
        if lead is None:
            return tokenizer
        # LLaMA's <s>: PrefixLM puts it in front of every prompt, as HF's tokenizer does
        return _checked_tokenizer(json_file, lambda: HFTokenizer(text, special | {"bos": lead}))
    special = T5_TOKENS | {role: token for role, token in names.items() if role in T5_TOKENS}
    if spiece.is_file():
        proto, extra_ids = spiece.read_bytes(), settings.get("extra_ids", T5_EXTRA_IDS)
        return _with_decoder_start(
            spiece,
            lambda named: SentencePieceTokenizer(proto, special=named, extra_ids=extra_ids),
            special,
            hf_config,
        )
    if json_file.is_file():
        text = json_file.read_text(encoding="utf-8")
        return _with_decoder_start(json_file, lambda named: HFTokenizer(text, named), special, hf_config)
    raise UserError(f"{directory}: no tokenizer (spiece.model or tokenizer.json); {FIX}")


def _checked_tokenizer(path: Path, build: Callable[[], Tokenizer]) -> Tokenizer:
    """Build a tokenizer, naming the file in any complaint about it."""
    try:
        return build()
    except UserError as error:
        raise UserError(f"{path}: {error}") from None


def _with_decoder_start(
    path: Path,
    build: Callable[[dict[str, str]], Tokenizer],
    special: dict[str, str],
    hf_config: SimpleNamespace,
) -> Tokenizer:
    """T5's config.json names the decoder's first token by id (decoder_start_token_id, its pad); the
    tokenizer names special tokens by piece, so the piece is looked up first."""
    start_id = hf_config.decoder_start_token_id
    probe = _checked_tokenizer(path, lambda: build(special))
    if not isinstance(start_id, int) or not 0 <= start_id < probe.vocab_size:
        raise UserError(
            f"{path}: config.json's decoder_start_token_id={start_id!r} is not an id of this tokenizer"
        )
    return _checked_tokenizer(path, lambda: build(special | {"start": probe.id_to_piece([start_id])[0]}))


def check_tokenizer_fits(config_path: Path, hf: SimpleNamespace, tokenizer: Tokenizer, rows: int) -> None:
    """The tokenizer must fit the embedding table and mean the ids config.json names."""
    if tokenizer.vocab_size > rows:
        raise UserError(
            f"{config_path}: vocab_size={rows} but the tokenizer has {tokenizer.vocab_size} ids; are the tokenizer "
            "files from another model?"
        )
    for role in ("pad", "eos"):
        named = getattr(hf, f"{role}_token_id", None)
        ours = getattr(tokenizer, f"{role}_id")
        if named is not None and ours is not None and named != ours:
            raise UserError(
                f"{config_path}: {role}_token_id={named} but the tokenizer's {role} token has id {ours}; are the "
                "tokenizer files from another model?"
            )


# ---------------------------------------------------------------------------------------- writing


def create_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Write a file or directory under a temporary name beside `target`, then rename it into place:
    a failed or killed conversion leaves nothing behind. An existing target is never overwritten.
    Every file written gets an ordinary new file's permissions: safetensors writes its files
    private to their owner, which would hide a shared model from the rest of a team."""
    if target.exists():
        raise UserError(f"{target}: already exists; remove it or choose another output path")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    umask = current_umask()
    try:
        write(partial / "out")
        for file in [partial / "out", *(partial / "out").rglob("*")]:
            if file.is_file():
                file.chmod(0o666 & ~umask)
        os.replace(partial / "out", target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
