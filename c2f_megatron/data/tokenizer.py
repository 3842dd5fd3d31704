"""Tokenizers behind one small interface: sentencepiece models and Hugging Face tokenizers.

The default is the Mistral-7B v0.1 sentencepiece model that ships inside the ``mistral-common`` wheel, so
the project tokenizes exactly like the model it fine-tunes without downloading anything. Other tokenizers
(a Hugging Face directory or hub name, or any ``.model`` file) go through the same :class:`Tokenizer`
interface so the data, RL and checkpoint code never branch on the backend.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import re
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

DEFAULT_TOKENIZER = "mistral-v0.1"
_MISTRAL_V01_RESOURCE = ("mistral_common", "data/tokenizer.model.v1")
# "owner/name" on the Hugging Face hub; bare legacy names ("gpt2") are refused so a typo in a local path
# fails fast instead of turning into a network request.
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# "tokenizer.model", and mistral-common's versioned names such as "tokenizer.model.v1".
_SP_MODEL_NAME = re.compile(r"\.model(\.v\w+)?$")


@dataclass(frozen=True)
class TokenizerInfo:
    """What a checkpoint records about its tokenizer, to refuse loading it with a different one later.

    ``fingerprint`` is a sha256 of the sentencepiece model bytes or of the Hugging Face vocabulary, so two
    tokenizers with the same name but different vocabularies are told apart.
    """

    name: str
    backend: str
    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int
    fingerprint: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenizerInfo:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


class Tokenizer(ABC):
    """Text <-> ids. ``encode`` never adds special tokens unless asked, so callers control BOS/EOS exactly."""

    name: str

    @abstractmethod
    def encode(
        self, text: str, add_bos: bool = False, add_eos: bool = False, parse_special: bool = False
    ) -> list[int]:
        """Token ids of ``text``.

        ``parse_special=True`` turns the literal strings of special tokens (``"<s>"``, ``"</s>"``) in the text
        into their ids, which multi-turn Mistral prompts rendered as text need; it is off by default because
        user text that happens to contain ``"</s>"`` must not end a sequence.
        """

    @abstractmethod
    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``; BOS, EOS and padding ids are dropped."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids (the embedding rows the model needs), including added tokens."""

    @property
    @abstractmethod
    def bos_id(self) -> int | None: ...

    @property
    @abstractmethod
    def eos_id(self) -> int: ...

    @property
    @abstractmethod
    def pad_id(self) -> int:
        """A real id to pad with; padded positions must still be masked out by the caller."""

    @property
    @abstractmethod
    def backend(self) -> str: ...

    @abstractmethod
    def _fingerprint(self) -> str: ...

    @property
    def adds_bos(self) -> bool:
        """Whether a sequence starts with BOS by this tokenizer's own convention (sentencepiece Llama and
        Mistral do; GPT-2-style BPE tokenizers such as SmolLM2's and Llama-3's chat templates do not)."""
        return self.bos_id is not None

    @property
    def chat_template(self) -> str | None:
        """The tokenizer's own chat template (Jinja), if it has one."""
        return None

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """``messages`` (``{"role", "content"}``) rendered as text by the tokenizer's own chat template."""
        raise ValueError(f"tokenizer {self.name!r} has no chat template")

    @abstractmethod
    def _continuation_ids(
        self, prompt: str, prompt_ids: list[int], response: str, separator: str, parse_special: bool
    ) -> list[int]:
        """Ids of ``response`` continuing ``prompt`` (which encodes to ``prompt_ids``) after ``separator``."""

    def encode_pair(
        self, prompt: str, response: str, separator: str = " ", parse_special: bool = False
    ) -> tuple[list[int], list[int]]:
        """Tokenize ``prompt`` alone and ``response`` as its continuation.

        The full text is ``prompt + separator + response``: HH ``"...Assistant: text"`` and Mistral
        ``"...[/INST] text"`` separate the response by one space (so a single leading space on
        ``response`` is treated as that separator, not doubled), chat templates by nothing. The prompt ids
        are exactly ``encode(prompt, parse_special=parse_special)``, which is what the policy is
        conditioned on during RL; the response ids are chosen so that ``prompt_ids + response_ids``
        tokenizes the full text the way the model sees it. No BOS/EOS is added; special-token strings in
        the response stay text.
        """
        if separator and response.startswith(separator):
            response = response[len(separator) :]
        prompt_ids = self.encode(prompt, parse_special=parse_special)
        return prompt_ids, self._continuation_ids(prompt, prompt_ids, response, separator, parse_special)

    def info(self) -> TokenizerInfo:
        return TokenizerInfo(
            name=self.name,
            backend=self.backend,
            vocab_size=self.vocab_size,
            bos_id=self.bos_id,
            eos_id=self.eos_id,
            pad_id=self.pad_id,
            fingerprint=self._fingerprint(),
        )

    def _with_special(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        if add_bos:
            if self.bos_id is None:
                raise ValueError(f"tokenizer {self.name!r} has no BOS token")
            ids = [self.bos_id, *ids]
        return [*ids, self.eos_id] if add_eos else ids

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece ``.model`` file (Mistral/Llama style: byte fallback, dummy-prefix space).

    Padding uses the ``<unk>`` id (0 for Mistral), not EOS: the model has no pad piece, and with byte
    fallback real text never encodes to ``<unk>``, so ``ids != pad_id`` masks padding without also masking
    the response's EOS, which the policy must learn to emit. If the model has no ``<unk>`` either, EOS is
    used.
    """

    def __init__(self, model_file: str | Path, name: str | None = None) -> None:
        import sentencepiece

        self.model_file = Path(model_file)
        self.name = name or str(self.model_file)
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(self.model_file))
        except (OSError, RuntimeError) as exc:
            raise ValueError(f"could not load sentencepiece model {str(self.model_file)!r}: {exc}") from exc
        if self._sp.eos_id() < 0:
            raise ValueError(f"sentencepiece model {self.model_file} has no EOS piece")
        self._special_re = re.compile(
            "(" + "|".join(re.escape(self._sp.id_to_piece(i)) for i in self._control_ids()) + ")"
        )

    def _control_ids(self) -> list[int]:
        return [i for i in (self._sp.bos_id(), self._sp.eos_id()) if i >= 0]

    def encode(
        self, text: str, add_bos: bool = False, add_eos: bool = False, parse_special: bool = False
    ) -> list[int]:
        if not parse_special:
            return self._with_special(self._sp.encode(text), add_bos, add_eos)
        # Each chunk between special strings is encoded on its own (with its own dummy-prefix space), which
        # is how mistral-common builds "[INST] u [/INST] a</s>[INST] u2 [/INST]" ids.
        ids: list[int] = []
        for chunk in self._special_re.split(text):
            if not chunk:
                continue
            piece_id = self._sp.piece_to_id(chunk)
            ids.extend([piece_id] if piece_id in self._control_ids() else self._sp.encode(chunk))
        return self._with_special(ids, add_bos, add_eos)

    def _continuation_ids(
        self, prompt: str, prompt_ids: list[int], response: str, separator: str, parse_special: bool
    ) -> list[int]:
        # Sentencepiece prefixes every encoded string with a space ("▁"), so encoding the response alone
        # yields the " response" the model sees after "Assistant:" / "[/INST]"; pieces never span that
        # space, so this equals the tail of encode(prompt + " " + response).
        if separator != " ":
            raise ValueError(
                f"sentencepiece tokenizer {self.name!r}: responses follow prompts after one space"
            )
        return self._sp.encode(response)

    def decode(self, ids: list[int]) -> str:
        drop = {self.pad_id, *self._control_ids()}
        return self._sp.decode([int(i) for i in ids if int(i) not in drop])

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    @property
    def bos_id(self) -> int | None:
        return self._sp.bos_id() if self._sp.bos_id() >= 0 else None

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        for candidate in (self._sp.pad_id(), self._sp.unk_id(), self._sp.eos_id()):
            if candidate >= 0:
                return candidate
        raise AssertionError("unreachable: eos_id is checked in __init__")

    @property
    def backend(self) -> str:
        return "sentencepiece"

    def _fingerprint(self) -> str:
        return hashlib.sha256(self.model_file.read_bytes()).hexdigest()


class HFTokenizer(Tokenizer):
    """Any ``transformers.AutoTokenizer`` (local directory or hub name).

    Padding uses the tokenizer's pad token, else its unk token, else EOS, skipping any that is the EOS
    (same reasoning as :class:`SentencePieceTokenizer`: keep padding distinguishable from a real EOS when
    possible; SmolLM2 declares ``<|im_end|>``, its EOS, as pad, so ``<|endoftext|>`` pads).
    """

    def __init__(self, spec: str) -> None:
        from transformers import AutoTokenizer

        self.name = spec
        try:
            self._tok = AutoTokenizer.from_pretrained(spec)
        except Exception as exc:  # transformers raises many types (OSError, ValueError, HTTP errors, ...)
            raise ValueError(
                f"could not load tokenizer {spec!r} with transformers.AutoTokenizer: {exc}"
            ) from exc
        if self._tok.eos_token_id is None:
            raise ValueError(f"tokenizer {spec!r} has no EOS token")
        probe = self._tok.encode("a", add_special_tokens=True)
        self._adds_bos = self.bos_id is not None and bool(probe) and probe[0] == self.bos_id

    def encode(
        self, text: str, add_bos: bool = False, add_eos: bool = False, parse_special: bool = False
    ) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False, split_special_tokens=not parse_special)
        return self._with_special(list(ids), add_bos, add_eos)

    @property
    def adds_bos(self) -> bool:
        return self._adds_bos

    @property
    def chat_template(self) -> str | None:
        return getattr(self._tok, "chat_template", None) or None

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise ValueError(f"tokenizer {self.name!r} has no chat template")
        return self._tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _continuation_ids(
        self, prompt: str, prompt_ids: list[int], response: str, separator: str, parse_special: bool
    ) -> list[int]:
        # Tokenizers differ in how they treat a leading space, so tokenize the full text and take what
        # follows the prompt ids; if the boundary merged (the full text's prefix is not the prompt's ids),
        # fall back to tokenizing separator + response on its own.
        full = self.encode(prompt + separator + response, parse_special=parse_special)
        if full[: len(prompt_ids)] == prompt_ids:
            return full[len(prompt_ids) :]
        return self.encode(separator + response)

    def decode(self, ids: list[int]) -> str:
        drop = {self.pad_id, self.eos_id, self.bos_id}
        return self._tok.decode([int(i) for i in ids if int(i) not in drop], skip_special_tokens=True)

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    @property
    def bos_id(self) -> int | None:
        return self._tok.bos_token_id

    @property
    def eos_id(self) -> int:
        return int(self._tok.eos_token_id)

    @property
    def pad_id(self) -> int:
        for candidate in (self._tok.pad_token_id, self._tok.unk_token_id):
            if candidate is not None and int(candidate) != self.eos_id:
                return int(candidate)
        return self.eos_id

    @property
    def backend(self) -> str:
        return "huggingface"

    def _fingerprint(self) -> str:
        vocab = json.dumps(sorted(self._tok.get_vocab().items(), key=lambda kv: kv[1]), ensure_ascii=False)
        return hashlib.sha256(vocab.encode("utf-8")).hexdigest()


def mistral_v01_model_path() -> Path:
    """Path of the Mistral-7B v0.1 sentencepiece model inside the installed mistral-common package."""
    package, resource = _MISTRAL_V01_RESOURCE
    try:
        path = Path(str(importlib.resources.files(package).joinpath(resource)))
    except ModuleNotFoundError as exc:
        raise ValueError(f"tokenizer {DEFAULT_TOKENIZER!r} needs the 'mistral-common' package") from exc
    if not path.is_file():
        raise ValueError(f"tokenizer {DEFAULT_TOKENIZER!r}: {resource} not found in {package} ({path})")
    return path


def load_tokenizer(spec: str | None = None) -> Tokenizer:
    """Load a tokenizer from a spec string.

    - ``None`` or ``"mistral-v0.1"``: the Mistral-7B v0.1 sentencepiece model from mistral-common
      (32000 ids, BOS 1, EOS 2, pad 0 = ``<unk>``).
    - a path ending in ``.model`` (or ``.model.v1`` etc., as in mistral-common): that sentencepiece file.
    - an existing directory: ``transformers.AutoTokenizer.from_pretrained(dir)``.
    - ``"owner/name"``: a Hugging Face hub tokenizer (needs the network or a populated HF cache).

    Anything else raises ``ValueError`` naming the spec.
    """
    if spec is None or spec == DEFAULT_TOKENIZER:
        return SentencePieceTokenizer(mistral_v01_model_path(), name=DEFAULT_TOKENIZER)
    path = Path(spec).expanduser()
    if _SP_MODEL_NAME.search(spec):
        if not path.is_file():
            raise ValueError(f"tokenizer spec {spec!r}: sentencepiece model file not found")
        return SentencePieceTokenizer(path)
    if path.is_dir():
        return HFTokenizer(str(path))
    if _HUB_NAME.match(spec) and not path.exists():
        return HFTokenizer(spec)
    raise ValueError(
        f"tokenizer spec {spec!r} is neither {DEFAULT_TOKENIZER!r}, a sentencepiece .model file, "
        "a Hugging Face tokenizer directory, nor an 'owner/name' hub id"
    )
