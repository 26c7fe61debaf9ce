"""`lima-lightning inspect`: rows shown as fit trains them, the trained tokens marked, problems warned about.

Expected texts and counts are rebuilt here from the data and direct tokenizer calls (`[BOS] [INST] user
[/INST]` untrained, ` answer</s>` trained), not read back from the code under test.
"""

from __future__ import annotations

import io
import json
import re
from html.parser import HTMLParser

import pytest

from lima_lightning.cli import main
from lima_lightning.commands.inspect_render import LEFT_OUT_MARK, print_views
from lima_lightning.commands.inspect_view import eos_problems, inspect_row, round_trip_problem
from lima_lightning.data.conversations import Conversation
from lima_lightning.data.tokenization import IGNORE_INDEX
from tests.conftest import LIMA_TRAIN, LLAMA2_TOKENIZER, REPO, needs_lima, needs_llama2_tokenizer

DEMO = str(REPO / "configs" / "demo.yaml")
QLORA = str(REPO / "configs" / "llama2-7b-qlora.yaml")
CUT = 40  # data.max_seq_length for the hand-built file
# Rows of the hand-built LIMA-format file, each exercising one case at max_seq_length=CUT (premises asserted below).
ROWS = [
    ["Hi", "Yo"],  # 0: whole, one answer
    ["Q" * 60, "A"],  # 1: the prompt alone is longer than CUT: nothing trained, fit drops it
    ["Hi", "Yo", "And?"],  # 2: ends on a user turn: that turn is left out
    ["Hi", "A" * 50],  # 3: cut inside the answer: no EOS there, and no warning for it
    ["Only a question"],  # 4: no answer at all
    ["Hi <b>&amp;", "x < y & z"],  # 5: HTML-special characters, escaped in the page
    ["Hi", "Yo", "Q" * 40, "A"],  # 6: cut inside the second prompt; the first answer keeps its EOS
    ["Hi", "\u2603" * 20],  # 7: cut in the middle of a snowman's 3 bytes (byte fallback): still round-trips
    ["Say </s> now", "ok"],  # 8: EOS written as text, read by the tokenizer as the EOS token
]
HEADER = re.compile(r"^row (\d+)  (\S+)  (train|validation) split.*$", re.M)
COUNTS = re.compile(r"^tokens (\d+), trained (\d+) \(.*$", re.M)
TRAINED = re.compile(r"\[trained\](.*?)\[/trained\]", re.S)


@pytest.fixture
def no_model_weights(monkeypatch):
    """Fail the test if anything tries to load model weights."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("inspect loaded model weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", refuse)


@pytest.fixture
def lima_file(tmp_path):
    path = tmp_path / "small.jsonl"
    path.write_text("".join(json.dumps({"conversations": r}) + "\n" for r in ROWS), encoding="utf-8")
    return path


def run_inspect(capsys, *args: str) -> tuple[dict[int, dict], str]:
    """Run `lima-lightning inspect ARGS` in-process; its plain-text output, parsed per row, and whole."""
    main(["inspect", *args])
    out = capsys.readouterr().out
    rows = {}
    for header in HEADER.finditer(out):
        counts = COUNTS.search(out, header.end())
        text = out[header.end() + 1 : counts.start() - 1]
        tail = out[counts.end() + 1 : out.find("\n\n", counts.end())]
        rows[int(header.group(1))] = {
            "where": header.group(2),
            "split": header.group(3),
            "text": text,
            "trained": TRAINED.findall(text),
            "counts": counts.group(0),
            "n_tokens": int(counts.group(1)),
            "n_trained": int(counts.group(2)),
            "warnings": [line for line in tail.splitlines() if line.startswith("warning:")],
        }
    return rows, out


def n_ids(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_demo_config_default_rows_match_fits_data_module(tiny_dir, tiny_tokenizer, no_model_weights, capsys):
    """The first 3 rows by default, each `<s> [INST] q [/INST]` untrained and ` a</s>` trained, split as fit splits."""
    from lima_lightning.cli import parse_fit_config
    from lima_lightning.data.datamodule import LIMADataModule
    from lima_lightning.data.synthetic import synthetic_conversations

    rows, out = run_inspect(capsys, "--config", DEMO)
    conversations = synthetic_conversations("train", 1000)  # the demo config's data.synthetic_size
    assert sorted(rows) == [0, 1, 2]
    for i, row in rows.items():
        q, a = conversations[i].turns
        assert row["text"] == f"<s> [INST] {q} [/INST][trained] {a}</s>[/trained]"
        assert row["n_tokens"] == 1 + n_ids(tiny_tokenizer, f"[INST] {q} [/INST]") + n_ids(tiny_tokenizer, a) + 1
        assert row["n_trained"] == n_ids(tiny_tokenizer, a) + 1 and row["warnings"] == []
        assert row["counts"].endswith("truncated no")
    total, trained = sum(r["n_tokens"] for r in rows.values()), sum(r["n_trained"] for r in rows.values())
    assert out.rstrip().endswith(f"3 rows shown: {total} tokens, {trained} trained ({trained / total:.1%}), 0 truncated, 0 warnings")

    # The split label agrees with fit's own data module: one validation row and one training row.
    data = LIMADataModule(**parse_fit_config(["--config", DEMO]).data)
    data.setup("fit")
    validation = {int(c.where.rsplit(":", 1)[1]) for c in data.val_conversations}
    first_val, first_train = min(validation), min(set(range(1000)) - validation)
    rows, _ = run_inspect(capsys, "--config", DEMO, "--rows", f"{first_val},{first_train}")
    assert (rows[first_val]["split"], rows[first_train]["split"]) == ("validation", "train")


def test_hand_built_rows_truncation_trailing_turn_and_warnings(tmp_path, lima_file, tiny_dir, tiny_tokenizer, no_model_weights, capsys):
    tok = tiny_tokenizer
    prompt = 1 + n_ids(tok, "[INST] Hi [/INST]")  # BOS + the prompt of "Hi"
    assert (tiny_dir / "model.safetensors").is_file()  # weights are there to load, and must not be
    assert 1 + n_ids(tok, f"[INST] {'Q' * 60} [/INST]") > CUT and prompt + n_ids(tok, "A" * 50) + 1 > CUT
    assert prompt + n_ids(tok, "Yo") + 1 < CUT < prompt + n_ids(tok, "Yo") + 1 + 1 + n_ids(tok, f"[INST] {'Q' * 40} [/INST]")
    assert (CUT - prompt - 1) % 3 != 0  # row 7: the cut falls inside a snowman's bytes (1 token for the space, 3 per snowman)

    rows, out = run_inspect(capsys, "--config", DEMO, "--data.dataset", str(lima_file), "--model.base_model", str(tiny_dir),
                            "--data.max_seq_length", str(CUT), "--rows", ",".join(map(str, range(len(ROWS)))))  # fmt: skip
    assert sorted(rows) == list(range(len(ROWS)))
    assert rows[3]["where"] == f"{lima_file}:4"
    cut = f"[cut: data.max_seq_length={CUT}; "
    warned = {i for i, r in rows.items() if r["warnings"]}
    assert warned == {1, 4, 8}

    assert rows[0]["trained"] == [" Yo</s>"] and rows[0]["text"] == "<s> [INST] Hi [/INST][trained] Yo</s>[/trained]"
    # 1: the cut falls in the first prompt: nothing trained, one warning that says why and that fit drops the row.
    assert rows[1]["trained"] == [] and rows[1]["n_trained"] == 0 and rows[1]["n_tokens"] == CUT and cut in rows[1]["text"]
    first_answer_at = 1 + n_ids(tok, f"[INST] {'Q' * 60} [/INST]")
    assert rows[1]["warnings"] == [
        f"warning: row 1: no token is trained: data.max_seq_length={CUT} cuts it before its first answer "
        f"(token {first_answer_at}); fit drops this row (raise data.max_seq_length to keep it)"
    ]
    # 2: the trailing user turn is not tokenized, and says so.
    assert rows[2]["text"] == f"<s> [INST] Hi [/INST][trained] Yo</s>[/trained]{LEFT_OUT_MARK}" and "And?" not in rows[2]["text"]
    assert "trailing user turn left out" in rows[2]["counts"]
    # 3: cut inside the answer: the trained text stops at the cut with no EOS, and that is not a warning.
    answer_tokens = n_ids(tok, "A" * 50) + 1
    assert rows[3]["trained"] == [" " + "A" * (CUT - prompt - 1)] and rows[3]["n_trained"] == CUT - prompt
    assert rows[3]["text"].endswith(f"[/trained]{cut}{prompt + answer_tokens - CUT} more tokens not trained]")
    assert f"truncated yes: cut at {CUT} of {prompt + answer_tokens} tokens, inside an answer" in rows[3]["counts"]
    assert rows[4]["warnings"] == ["warning: row 4: no token is trained: the row has no answer (only a user turn); fit drops it"]
    assert rows[5]["trained"] == [" x < y & z</s>"]
    # 6: the first answer is whole (EOS trained); the cut falls in the next prompt.
    assert rows[6]["trained"] == [" Yo</s>"] and "inside a prompt" in rows[6]["counts"] and cut in rows[6]["text"]
    whole, part = divmod(CUT - prompt - 1, 3)  # snowmen kept whole, bytes of the one the cut splits
    assert rows[7]["trained"] == [" " + "\u2603" * whole + "".join(f"<0x{b:02X}>" for b in "\u2603".encode()[:part])]
    assert rows[8]["warnings"] == [
        "warning: row 8: the text holds '</s>', which the tokenizer reads as the special token (id 2), not as text: "
        "fit feeds the model a special token the template never put there"
    ]
    assert out.rstrip().endswith(f"{len(ROWS)} rows shown: {sum(r['n_tokens'] for r in rows.values())} tokens, "
                                 f"{sum(r['n_trained'] for r in rows.values())} trained ("
                                 f"{sum(r['n_trained'] for r in rows.values()) / sum(r['n_tokens'] for r in rows.values()):.1%}), "
                                 "4 truncated, 3 warnings")  # fmt: skip


def test_untrained_eos_is_warned_about_unless_the_answer_is_cut(lima_file, tiny_dir, no_model_weights, monkeypatch, capsys):
    """The old project's bug, planted in tokenization: EOS appended but not trained. inspect says so, per answer."""
    import lima_lightning.data.tokenization as tokenization

    segments = tokenization._segments

    def eos_untrained(*args, **kwargs):
        for ids, trained in segments(*args, **kwargs):
            yield (ids[:-1], True) if trained else (ids, False)
            if trained:
                yield ids[-1:], False

    monkeypatch.setattr(tokenization, "_segments", eos_untrained)
    rows, _ = run_inspect(capsys, "--config", DEMO, "--data.dataset", str(lima_file), "--model.base_model", str(tiny_dir),
                          "--data.max_seq_length", str(CUT), "--rows", "0,3,6")  # fmt: skip
    assert len(rows[0]["warnings"]) == 1 and "is not followed by EOS </s> (it ends with 'o'" in rows[0]["warnings"][0]
    assert rows[3]["warnings"] == []  # cut inside its answer: no EOS is expected there
    assert len(rows[6]["warnings"]) == 1 and "is not followed by EOS" in rows[6]["warnings"][0]  # its whole first answer


def test_eos_check_spares_only_the_answer_at_the_cut(tiny_tokenizer):
    eos, a, b = tiny_tokenizer.eos_token_id, 300, 301
    ids = [1, a, b, eos, 1, a, b]
    labels = [IGNORE_INDEX, a, b, eos, IGNORE_INDEX, a, b]  # a whole answer, then one cut after two tokens
    assert eos_problems(ids, labels, tiny_tokenizer, truncated=True) == []
    assert len(eos_problems(ids, labels, tiny_tokenizer, truncated=False)) == 1  # not cut: the last answer lacks EOS
    no_eos_first = [IGNORE_INDEX, a, b, IGNORE_INDEX, IGNORE_INDEX, a, b]
    assert len(eos_problems(ids, no_eos_first, tiny_tokenizer, truncated=True)) == 1


def test_a_tokenizer_that_loses_text_is_warned_about(tmp_path, no_model_weights, capsys):
    """Without byte fallback the tiny tokenizer writes <unk> for a snowman: the decoded ids are not the data."""
    from lima_lightning.models.tiny import build_tiny_tokenizer

    lossy = build_tiny_tokenizer()
    lossy.backend_tokenizer.model.byte_fallback = False
    lossy.save_pretrained(tmp_path / "lossy")  # a tokenizer-only directory, as ../shared/llama2-tokenizer
    data = tmp_path / "snow.jsonl"
    data.write_text(json.dumps({"conversations": ["Hi", "a \u2603 b"]}) + "\n", encoding="utf-8")
    rows, _ = run_inspect(capsys, "--config", DEMO, "--data.dataset", str(data), "--model.base_model", str(tmp_path / "lossy"))
    at = len("<s> [INST] Hi [/INST] a ")
    assert rows[0]["warnings"] == [
        f"warning: row 0: decoding the ids does not give back the rendered text: they differ at character {at}, "
        f"decoded {'[INST] Hi [/INST] a <unk> b</s>'!r}, rendered {'[INST] Hi [/INST] a ' + chr(0x2603) + ' b</s>'!r}"
    ]


def test_cut_character_tokens_counts_the_bytes_of_a_split_character(tiny_tokenizer):
    from lima_lightning.commands.inspect_view import cut_character_tokens

    def ids(text: str) -> list[int]:
        return tiny_tokenizer(text, add_special_tokens=False)["input_ids"]

    snowman, emoji = ids("\u2603"), ids("\U0001f389")  # '▁' then 3 and 4 byte tokens
    assert len(snowman) == 4 and len(emoji) == 5
    assert [cut_character_tokens(snowman[:k], tiny_tokenizer) for k in range(1, 5)] == [0, 1, 2, 0]
    assert [cut_character_tokens(emoji[:k], tiny_tokenizer) for k in range(1, 6)] == [0, 1, 2, 3, 0]
    assert cut_character_tokens(ids("ab") + snowman[1:] + snowman[1:3], tiny_tokenizer) == 2  # a whole snowman, then 2 bytes
    assert cut_character_tokens(ids("\t"), tiny_tokenizer) == 0  # a 1-byte character as a byte token: whole


def test_round_trip_comparison():
    assert round_trip_problem("<s> [INST] x [/INST] ab</s>", "<s> [INST] x [/INST] ab</s>", truncated=False) is None
    assert round_trip_problem("<s> [INST] x [/INST] a", "<s> [INST] x [/INST] ab</s>", truncated=False)  # short, not cut
    assert round_trip_problem("<s> [INST] x [/INST] a", "<s> [INST] x [/INST] a\u2603</s>", truncated=True) is None
    assert round_trip_problem("<s> [INST] x [/INST] b", "<s> [INST] x [/INST] ab</s>", truncated=True)


class Spans(HTMLParser):
    """Per row section: the text inside each outermost class="trained" span, and all text of its <pre>."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.rows: dict[int, dict] = {}
        self.row = None
        self.depth = 0  # open spans; the trained one's depth while inside it
        self.trained_at = None
        self.in_pre = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.row = self.rows.setdefault(int(attrs["id"].removeprefix("row-")), {"trained": [], "pre": ""})
        elif tag == "pre":
            self.in_pre = True
        elif tag == "span" and self.in_pre:
            self.depth += 1
            if attrs.get("class") == "trained":
                self.trained_at = self.depth
                self.row["trained"].append("")
        elif self.in_pre:
            raise AssertionError(f"unexpected <{tag}> inside a conversation: data text was not escaped")

    def handle_endtag(self, tag):
        if tag == "pre":
            self.in_pre = False
        elif tag == "span" and self.in_pre:
            if self.depth == self.trained_at:
                self.trained_at = None
            self.depth -= 1

    def handle_data(self, data):
        if self.in_pre:
            self.row["pre"] += data
            if self.trained_at is not None:
                self.row["trained"][-1] += data


def test_html_marks_exactly_the_trained_text_and_is_written_atomically(lima_file, tiny_dir, no_model_weights, tmp_path, capsys):
    page = tmp_path / "out" / "inspect.html"
    page.parent.mkdir()
    page.write_text("an older page")
    rows, out = run_inspect(capsys, "--config", DEMO, "--data.dataset", str(lima_file), "--model.base_model", str(tiny_dir),
                            "--data.max_seq_length", str(CUT), "--rows", ",".join(map(str, range(len(ROWS)))),
                            "--html", str(page))  # fmt: skip
    assert out.rstrip().endswith(f"wrote {page}") and [p.name for p in page.parent.iterdir()] == ["inspect.html"]
    html_text = page.read_text(encoding="utf-8")
    assert html_text.startswith("<!DOCTYPE html>") and "<script" not in html_text and "http" not in html_text  # self-contained
    assert "&lt;b&gt;&amp;amp;" in html_text and "x &lt; y &amp; z" in html_text
    parsed = Spans()
    parsed.feed(html_text)
    assert sorted(parsed.rows) == sorted(rows)
    for i, row in rows.items():
        # The same trained texts as the terminal's marks, which test_hand_built_rows checks against the data.
        assert parsed.rows[i]["trained"] == row["trained"], i
        assert parsed.rows[i]["pre"] == row["text"].replace("[trained]", "").replace("[/trained]", ""), i
    assert parsed.rows[0]["trained"] == [" Yo</s>"] and parsed.rows[5]["trained"] == [" x < y & z</s>"]
    assert '<span class="trained"> Yo<span class="special">&lt;/s&gt;</span></span>' in html_text


def test_colour_terminal_marks_trained_tokens_green(tiny_tokenizer):
    """On a colour terminal the marks are colours: green text is exactly the answer and its EOS."""
    from rich.console import Console

    view = inspect_row(0, Conversation(("Hi", "Yo")), tiny_tokenizer, "llama2-chat", 256, "train")
    kwargs = {"highlight": False, "markup": False, "emoji": False, "soft_wrap": True, "force_terminal": True}
    console = Console(file=io.StringIO(), color_system="standard", **kwargs)
    print_views([view], "intro", console)
    out = console.file.getvalue()
    green, active = "", set()
    for codes, text in re.findall(r"\x1b\[([0-9;]*)m([^\x1b]*)", out):
        active = set() if codes in ("", "0") else active | set(codes.split(";"))
        green += text if "32" in active else ""
    assert green == " Yo</s>" and "[trained]" not in out
    no_colour = Console(file=io.StringIO(), no_color=True, **kwargs)  # NO_COLOR: no colours, so marks instead
    print_views([view], "intro", no_colour)
    assert "[INST] Hi [/INST][trained] Yo</s>[/trained]" in re.sub(r"\x1b\[[0-9;]*m", "", no_colour.file.getvalue())


def test_bad_rows_and_html_path_are_one_line(lima_file, tiny_dir, capsys):
    args = ["inspect", "--config", DEMO, "--data.dataset", str(lima_file), "--model.base_model", str(tiny_dir)]
    for rows, message in [
        ("0,x", "--rows 0,x: 'x' is not a row index; give 0-based row numbers separated by commas, e.g. 0,5,1021"),
        ("-1", "--rows -1: '-1' is not a row index; give 0-based row numbers separated by commas, e.g. 0,5,1021"),
        (
            f"0,{len(ROWS)},12",
            f"--rows {len(ROWS)},12: out of range; data.dataset={lima_file} has rows 0-{len(ROWS) - 1} "
            "(0-based, in file order, before the train/validation split)",
        ),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main([*args, "--rows", rows])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.strip() == f"lima-lightning: error: {message}"
    with pytest.raises(SystemExit):  # fit's own checks of its options apply
        main([*args, "--data.max_seq_length", "8"])
    assert capsys.readouterr().err.strip() == "lima-lightning: error: data.max_seq_length=8: must be at least 16"
    with pytest.raises(SystemExit):
        main([*args, "--html", str(lima_file.parent)])
    assert capsys.readouterr().err.strip() == (
        f"lima-lightning: error: --html {lima_file.parent}: is a directory; give a file name, e.g. {lima_file.parent / 'inspect.html'}"
    )
    main([*args, "--rows", str(len(ROWS) - 1)])  # the last row is in range
    assert f"row {len(ROWS) - 1}  " in capsys.readouterr().out


@needs_lima
@needs_llama2_tokenizer
def test_lima_row_1021_and_a_row_the_cut_empties(llama2_tokenizer, no_model_weights, capsys):
    """Row 1021 (0-based) is LIMA's one conversation that ends on a user turn: both answers trained, the turn left out."""
    lines = LIMA_TRAIN.read_text(encoding="utf-8").splitlines()
    turns = json.loads(lines[1021])["conversations"]
    assert len(turns) == 5  # the premise: user, assistant, user, assistant, user
    rows, _ = run_inspect(capsys, "--config", QLORA, "--data.dataset", str(LIMA_TRAIN), "--model.base_model", str(LLAMA2_TOKENIZER),
                          "--data.max_seq_length", "1024", "--rows", "1021,418")  # fmt: skip
    row = rows[1021]
    assert row["where"] == f"{LIMA_TRAIN}:1022" and row["warnings"] == []
    assert row["trained"] == [f" {turns[1].strip()}</s>", f" {turns[3].strip()}</s>"]
    assert row["text"].startswith(f"<s> [INST] {turns[0].strip()} [/INST][trained]") and row["text"].endswith(LEFT_OUT_MARK)
    assert turns[4].strip() not in row["text"] and "trailing user turn left out" in row["counts"]
    tok = llama2_tokenizer
    pairs = zip(turns[0:4:2], turns[1:4:2], strict=True)  # (prompt tokens with BOS, answer tokens with EOS) per exchange
    exchanges = [(1 + n_ids(tok, f"[INST] {u.strip()} [/INST]"), n_ids(tok, a.strip()) + 1) for u, a in pairs]
    assert row["n_tokens"] == sum(p + a for p, a in exchanges) <= 1024 and row["n_trained"] == sum(a for _, a in exchanges)
    # Row 418's first prompt is longer than 1024 tokens: fit drops it (`lima-lightning stats`: 4 dropped at 1024).
    first = json.loads(lines[418])["conversations"][0].strip()
    assert rows[418]["n_trained"] == 0 and rows[418]["warnings"] == [
        f"warning: row 418: no token is trained: data.max_seq_length=1024 cuts it before its first answer "
        f"(token {1 + n_ids(tok, f'[INST] {first} [/INST]')}); fit drops this row (raise data.max_seq_length to keep it)"
    ]
