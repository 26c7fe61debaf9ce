"""GGUF export (`lima_lightning.gguf_export`): the file reads back as the model it was written from.

Files are loaded back with transformers' GGUF loader, an independent reader that undoes llama.cpp's conventions,
and the logits compared: f16 to rounding, Q8_0 within the measured bound, from fp32 and bf16 models. A seeded
tiny Llama with Llama-2's real vocabulary (32000 tokens, ../shared/llama2-tokenizer) is written with it; the
vocabulary read back by transformers' GGUF tokenizer must encode text as the Hugging Face tokenizer does.
Reading a 32000-token vocabulary costs transformers ~1.2 s each time, so the numerics run on the built-in
354-token vocabulary and the Llama-2 one is read back as few times as the checks need.
"""

from __future__ import annotations

import pytest
import torch

from lima_lightning.errors import UserError
from lima_lightning.gguf_export import (
    _tensor_plan,
    gguf_logit_bound,
    rope_rows_for_llama_cpp,
    verify_gguf,
    write_gguf,
)
from lima_lightning.gguf_vocab import LLAMA2_CHAT_TEMPLATE
from tests.conftest import LLAMA2_TOKENIZER, needs_llama2_tokenizer

PROMPTS = torch.randint(3, 32000, (4, 24), generator=torch.Generator().manual_seed(0))
SAMPLE = "Hello world, this is LIMA: 42 tokens.\nÜnïcödé 日本語 🤖 naïve café\tand a tab. [INST] Why is the sky blue? [/INST]"
INDENTED = "def f(x):\n    return x  # two spaces"


def tiny_llama(vocab_size: int = 32000, **overrides):
    """Seeded fp32 Llama with Llama-2's layout, head dims that fill Q8_0's 32-blocks, and grouped-query attention.

    rms_norm_eps is Llama-2's (1e-5, not transformers' default 1e-6) and rope_theta is not the default either,
    so a key missing from the file would make the loader fall back on a different value and show in the logits.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=50000.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**{**settings, **overrides}))
        model.lm_head.weight.mul_(15.0)  # a trained model's logit range (see models/tiny.py), not +-1
        for name, p in model.named_parameters():
            if "norm" in name:  # norms away from 1, so that writing them wrongly would show
                p.uniform_(0.5, 1.5)
            if "q_proj" in name or "k_proj" in name:  # peaked attention, as trained, so that rotary errors show
                p.mul_(5.0)
    return model.eval()


@pytest.fixture(scope="module")
def written(tmp_path_factory, llama2_tokenizer):
    """The tiny Llama with Llama-2's vocabulary, written once as Q8_0 (the type `export` suggests)."""
    model = tiny_llama()
    return model, write_gguf(model, llama2_tokenizer, tmp_path_factory.mktemp("gguf") / "tiny.q8_0.gguf", "q8_0")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_f16_round_trips_to_rounding_and_q8_0_within_the_measured_bound(tmp_path, dtype):
    """Both types from both model dtypes, on the tiny Llama with the built-in tokenizer: 354 tokens read fast."""
    from lima_lightning.models.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tokenizer)).to(dtype)  # `.to` as export's merge does
    prompts = torch.randint(3, len(tokenizer), (4, 24), generator=torch.Generator().manual_seed(0))
    f16 = write_gguf(model, tokenizer, tmp_path / "tiny.f16.gguf", "f16")
    q8_0 = write_gguf(model, tokenizer, tmp_path / "tiny.q8_0.gguf", "q8_0")
    assert verify_gguf(f16, model, prompts) <= gguf_logit_bound("f16", dtype)  # measured 4.7e-4 (fp32), 5.6e-3 (bf16)
    difference = verify_gguf(q8_0, model, prompts)
    assert difference <= gguf_logit_bound("q8_0", dtype)  # measured 1.1e-2 (fp32), 1.3e-2 (bf16)
    if dtype == torch.float32:
        assert difference > gguf_logit_bound("f16", dtype)  # the quantization is real, not f16 under another name
    assert q8_0.stat().st_size < 0.6 * f16.stat().st_size


@needs_llama2_tokenizer
def test_q8_0_round_trip_with_the_llama2_vocabulary(written):
    model, path = written
    assert verify_gguf(path, model, PROMPTS) <= gguf_logit_bound("q8_0", torch.float32)  # measured 1.2e-2


@needs_llama2_tokenizer
def test_llama_cpp_itself_reads_the_file_as_transformers_does(written, llama2_tokenizer):
    """Only with llama-cpp-python installed (not a dependency: it builds llama.cpp from source, ~30 min on 2 cores).

    Measured with llama-cpp-python 0.3.36: 1.5e-2 relative (1.8e-1 abs) for Q8_0 against the fp32 model, a little
    above transformers' 1.2e-2, as llama.cpp also rounds activations (f16 KV cache, Q8_0 matmul inputs).
    """
    llama_cpp = pytest.importorskip("llama_cpp")
    from lima_lightning.models.verify import prompt_logits

    model, path = written
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, logits_all=True, verbose=False, n_threads=2)
    worst, scale = 0.0, 0.0
    for ids in PROMPTS:
        llm.reset()
        llm.eval(ids.tolist())
        ours = torch.from_numpy(llm.scores[: len(ids)].copy())
        reference = prompt_logits(model, ids)
        worst, scale = max(worst, (ours - reference).abs().max().item()), max(scale, reference.abs().max().item())
    assert worst / scale <= gguf_logit_bound("q8_0", torch.float32)
    assert llm.tokenize(SAMPLE.encode(), add_bos=True, special=False) == llama2_tokenizer(SAMPLE)["input_ids"]
    assert llm.metadata["tokenizer.chat_template"] == LLAMA2_CHAT_TEMPLATE


def read_back(path):
    """(metadata, {tensor name: ggml type}) of a GGUF file.

    transformers' reader when it has one (0.06 s for Llama-2's vocabulary), else the gguf package's (1.2 s).
    """
    try:
        from transformers.integrations.gguf.reader import GgufHeader, read_gguf_metadata
    except ImportError:
        import gguf

        reader = gguf.GGUFReader(path)
        return {key: field.contents() for key, field in reader.fields.items()}, {t.name: t.tensor_type for t in reader.tensors}
    metadata, _ = read_gguf_metadata(str(path), ("tokenizer.ggml.tokens",))
    return metadata, GgufHeader.from_file(str(path)).ggml_types


@needs_llama2_tokenizer
def test_metadata_and_tensor_types_follow_llama_cpp(written):
    import gguf
    from sentencepiece import SentencePieceProcessor

    model, path = written
    metadata, stored = read_back(path)
    value = metadata.__getitem__

    assert value("general.architecture") == "llama"
    assert value("general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    expected = {
        "llama.context_length": 4096,
        "llama.embedding_length": 64,
        "llama.block_count": 2,
        "llama.feed_forward_length": 192,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.rope.dimension_count": 16,
        "llama.vocab_size": 32000,
    }
    assert {key: value(key) for key in expected} == expected
    assert value("llama.rope.freq_base") == pytest.approx(50000.0)
    assert value("llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)

    sp = SentencePieceProcessor(model_file=str(LLAMA2_TOKENIZER / "tokenizer.model"))
    assert value("tokenizer.ggml.model") == "llama"
    tokens, scores, types = (value(f"tokenizer.ggml.{k}") for k in ("tokens", "scores", "token_type"))
    assert tokens == [sp.id_to_piece(i) for i in range(32000)]
    assert scores[259:262] == [sp.get_score(i) for i in range(259, 262)]
    assert types[:4] == [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL, gguf.TokenType.BYTE]
    ids = {k: value(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding")}
    assert ids == {"bos": 1, "eos": 2, "unknown": 0, "padding": 0}
    assert value("tokenizer.ggml.add_bos_token") is True
    assert value("tokenizer.ggml.add_eos_token") is False
    assert value("tokenizer.chat_template") == LLAMA2_CHAT_TEMPLATE

    assert len(stored) == len(model.state_dict())  # untied: output.weight is its own tensor
    assert stored["blk.0.attn_norm.weight"] == stored["output_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert {stored[n] for n in ("token_embd.weight", "blk.1.attn_k.weight", "blk.1.ffn_down.weight", "output.weight")} == {
        gguf.GGMLQuantizationType.Q8_0
    }


def test_tensor_plan_keeps_norms_f32_and_falls_back_to_f16_for_rows_q8_0_cannot_block():
    import gguf

    F32, F16, Q8_0 = (gguf.GGMLQuantizationType[t] for t in ("F32", "F16", "Q8_0"))
    f16 = {gguf_name: qtype for _, _, gguf_name, qtype in _tensor_plan(tiny_llama(vocab_size=64), "f16")}
    assert f16["blk.0.ffn_norm.weight"] == F32 and f16["blk.0.attn_q.weight"] == F16 and f16["output.weight"] == F16
    # intermediate_size 200 is no multiple of 32: ffn_down's rows (200 values) cannot be cut into Q8_0 blocks.
    q8 = {gguf_name: qtype for _, _, gguf_name, qtype in _tensor_plan(tiny_llama(vocab_size=64, intermediate_size=200), "q8_0")}
    assert q8["blk.0.ffn_down.weight"] == F16 and q8["blk.0.ffn_up.weight"] == Q8_0 and q8["output_norm.weight"] == F32
    tied = _tensor_plan(tiny_llama(vocab_size=64, tie_word_embeddings=True), "f16")
    assert "output.weight" not in {gguf_name for _, _, gguf_name, _ in tied}  # llama.cpp reuses token_embd


def test_q_k_row_order_turns_transformers_rope_into_llama_cpps():
    """Rotating with transformers' rotate_half and reordering the rows equals llama.cpp's rope on reordered rows.

    llama.cpp's `llama` rope rotates adjacent pairs (2i, 2i+1) by angle p * theta^(-2i/d); transformers rotates
    (i, i + d/2) by the same angle. Written out here from the two definitions, not from either converter.
    """
    n_heads, head_dim, positions = 2, 8, torch.arange(5.0)
    angles = positions[:, None] * 10000.0 ** (-torch.arange(0, head_dim, 2) / head_dim)  # (pos, d/2)
    weight = torch.randn(n_heads * head_dim, 6, generator=torch.Generator().manual_seed(0))
    x = torch.randn(6, generator=torch.Generator().manual_seed(1))

    def hf_rope(q):  # (pos, heads, d): halves rotated against each other
        first, second = q[..., : head_dim // 2], q[..., head_dim // 2 :]
        cos, sin = angles.cos()[:, None], angles.sin()[:, None]
        return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)

    def llama_cpp_rope(q):  # adjacent pairs rotated
        even, odd = q[..., 0::2], q[..., 1::2]
        cos, sin = angles.cos()[:, None], angles.sin()[:, None]
        return torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1).flatten(-2)

    def reorder(vector):  # the file's row order, applied to one projected vector
        return rope_rows_for_llama_cpp(vector[:, None], n_heads)[:, 0]

    q = weight @ x
    per_head = (len(positions), n_heads, head_dim)
    transformers_side = hf_rope(q.reshape(n_heads, head_dim).expand(per_head)).reshape(len(positions), -1)
    llama_cpp_side = llama_cpp_rope((rope_rows_for_llama_cpp(weight, n_heads) @ x).reshape(n_heads, head_dim).expand(per_head))
    # The same rotated vectors, in the file's row order: q.k dot products, and so attention, are unchanged.
    torch.testing.assert_close(llama_cpp_side.reshape(len(positions), -1), torch.stack([reorder(v) for v in transformers_side]))
    assert not torch.equal(rope_rows_for_llama_cpp(weight, n_heads), weight)


@needs_llama2_tokenizer
def test_gguf_vocabulary_encodes_text_as_the_llama2_tokenizer_does(written, llama2_tokenizer):
    from transformers import AutoTokenizer

    _, path = written
    from_gguf = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert from_gguf(SAMPLE)["input_ids"] == llama2_tokenizer(SAMPLE)["input_ids"]
    assert from_gguf(SAMPLE)["input_ids"][0] == 1  # add_bos
    assert from_gguf.decode(from_gguf(SAMPLE)["input_ids"], skip_special_tokens=True) == SAMPLE
    # Runs of spaces: the SentencePiece scores tokenize as SentencePiece (and llama.cpp) do, which is not quite
    # what Hugging Face's converted Llama-2 tokenizer does (it merges "▁▁" first).
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(LLAMA2_TOKENIZER / "tokenizer.model"))
    assert from_gguf(INDENTED)["input_ids"] == [1, *sp.encode(INDENTED)]


@needs_llama2_tokenizer
def test_a_tokenizer_json_without_tokenizer_model_gives_the_same_vocabulary(tmp_path, written, llama2_tokenizer):
    """transformers >= 5 saves only tokenizer.json, so a fit run's adapters/ hold no tokenizer.model."""
    from transformers import AutoTokenizer

    from lima_lightning.gguf_vocab import _vocab_from_sentencepiece, _vocab_from_tokenizer_json
    from lima_lightning.models.loading import load_tokenizer

    llama2_tokenizer.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved" / "tokenizer.model").exists()
    json_only = load_tokenizer(str(tmp_path / "saved"))
    tokens, _, types = _vocab_from_tokenizer_json(json_only)
    sp_tokens, _, sp_types = _vocab_from_sentencepiece(LLAMA2_TOKENIZER / "tokenizer.model")
    assert (tokens, types) == (sp_tokens, sp_types)

    model, _ = written
    write_gguf(model, json_only, tmp_path / "json.gguf", "f16")
    from_gguf = AutoTokenizer.from_pretrained(tmp_path, gguf_file="json.gguf")
    for text in (SAMPLE, INDENTED):  # scores from the merge ranks: the very tokenization it was trained with
        assert from_gguf(text)["input_ids"] == llama2_tokenizer(text)["input_ids"]


def test_the_built_in_tiny_tokenizer_encodes_as_it_did(tmp_path):
    """lima-lightning's tiny tokenizer has only a tokenizer.json (a character BPE with byte fallback, no merges)."""
    from transformers import AutoTokenizer

    from lima_lightning.models.tiny import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    write_gguf(build_tiny_model(len(tokenizer)), tokenizer, tmp_path / "tiny.gguf", "q8_0")
    from_gguf = AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    for text in (SAMPLE, INDENTED):
        assert from_gguf(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_chat_template_renders_the_training_prompt_format():
    """Text as data/templates.py writes it; BOS/EOS as data/tokenization.py puts them around each turn.

    llama.cpp starts every text fragment after a special token with "▁", as the training ids do (each
    segment is tokenized on its own), so "<s>[INST]" becomes the ids of BOS + prompt exactly.
    """
    from lima_lightning.data.templates import llama2_chat_prompt
    from lima_lightning.models.tiny import build_tiny_tokenizer

    tiny_tokenizer = build_tiny_tokenizer()

    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Why?"},
    ]
    rendered = tiny_tokenizer.apply_chat_template(messages, chat_template=LLAMA2_CHAT_TEMPLATE, tokenize=False)
    assert rendered == f"<s>{llama2_chat_prompt('Hi there', 'Be brief.')} Hello!</s><s>{llama2_chat_prompt('Why?')}"
    alone = tiny_tokenizer.apply_chat_template(messages[1:2], chat_template=LLAMA2_CHAT_TEMPLATE, tokenize=False)
    assert alone == f"<s>{llama2_chat_prompt('Hi there')}"


def test_a_failure_part_way_leaves_no_file_and_keeps_the_previous_one(tmp_path, monkeypatch):
    import gguf

    from lima_lightning.models.tiny import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(len(tokenizer))
    real_write = gguf.GGUFWriter.write_tensor_data
    calls = []

    def crash_on_the_third_tensor(self, tensor, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return real_write(self, tensor, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", crash_on_the_third_tensor)
    with pytest.raises(OSError, match="disk full"):
        write_gguf(model, tokenizer, tmp_path / "new.gguf", "f16")
    assert list(tmp_path.iterdir()) == []  # no target, no temporary

    previous = tmp_path / "old.gguf"
    previous.write_bytes(b"an earlier export")
    calls.clear()
    with pytest.raises(OSError, match="disk full"):
        write_gguf(model, tokenizer, previous, "f16")
    assert previous.read_bytes() == b"an earlier export" and list(tmp_path.iterdir()) == [previous]

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", real_write)
    assert write_gguf(model, tokenizer, previous, "f16").read_bytes()[:4] == b"GGUF"
    assert list(tmp_path.iterdir()) == [previous]


def test_what_llama_cpp_would_misread_is_refused_in_one_line(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from lima_lightning.models.tiny import build_tiny_tokenizer

    word_level = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3}, unk_token="<unk>")),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
    )
    model = tiny_llama(vocab_size=259 + 95)
    with pytest.raises(UserError, match=r"tokenizer.model\) or a tokenizer.json of the same kind.*WordLevel") as refused:
        write_gguf(tiny_llama(vocab_size=4), word_level, tmp_path / "x.gguf", "f16")
    assert "\n" not in str(refused.value)
    with pytest.raises(UserError, match="--gguf_type=q4_0"):
        write_gguf(model, build_tiny_tokenizer(), tmp_path / "x.gguf", "q4_0")
    with pytest.raises(UserError, match="tokenizer has 354 tokens but the model's embedding only 300"):
        write_gguf(tiny_llama(vocab_size=300), build_tiny_tokenizer(), tmp_path / "x.gguf", "f16")
    with pytest.raises(UserError, match="attention_bias"):
        write_gguf(tiny_llama(vocab_size=354, attention_bias=True), build_tiny_tokenizer(), tmp_path / "x.gguf", "f16")
    assert list(tmp_path.iterdir()) == []
