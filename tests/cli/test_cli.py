import json
import subprocess
import sys

import pytest

from tformer import kernels
from tformer.cli.main import main


def run_cli(capsys, *argv):
    main(list(argv))
    return capsys.readouterr().out


def test_info_of_preset_as_json(capsys):
    d = json.loads(run_cli(capsys, "info", "gpt2", "--json"))
    assert d["parameters"] == 124_439_808 and d["config"]["n_layers"] == 12


def test_init_writes_hf_layout_with_tokenizer(checkpoint, capsys):
    names = {p.name for p in checkpoint.iterdir()}
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt"} <= names
    d = json.loads(run_cli(capsys, "info", str(checkpoint), "--json"))
    assert d["config"]["d_model"] == 32


def test_generate_json_is_reproducible(checkpoint, capsys):
    argv = [
        "generate",
        str(checkpoint),
        "--prompt",
        "Hello",
        "--max-new-tokens",
        "8",
        "--seed",
        "1",
        "--json",
    ]
    a = json.loads(run_cli(capsys, *argv))
    b = json.loads(run_cli(capsys, *argv))
    assert a["completion"] == b["completion"] and a["new_tokens"] <= 8


def test_generate_streams_prompt_and_completion(checkpoint, capsys):
    out = run_cli(
        capsys, "generate", str(checkpoint), "--prompt", "Hi", "--max-new-tokens", "5", "--greedy"
    )
    assert out.startswith("Hi") and len(out) > 2


def test_tokenize_json(capsys):
    d = json.loads(run_cli(capsys, "tokenize", "Hello world", "--json"))
    assert d["ids"] == [15496, 995] and d["pieces"] == ["Hello", " world"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "/nonexistent/ckpt", "--prompt", "x"], "no such directory"),
        (["generate", "{ckpt}", "--prompt-file", "{ckpt}"], "Is a directory"),
        (
            ["generate", "{ckpt}", "--prompt", "x", "--top-p", "2"],
            "argument --top-p: must be a finite number in (0, 1]",
        ),
        (["info", "gpt5"], "gpt5"),
        (["init", "/tmp/x", "--n-heads", "5"], "divisible"),
        (["init", "{ckpt}/config.json/sub"], "Not a directory"),
        (["tokenize", "x", "--tokenizer", "/nonexistent"], "no such directory"),
    ],
)
def test_bad_input_is_one_line_error_not_a_traceback(checkpoint, argv, message):
    argv = [a.replace("{ckpt}", str(checkpoint)) for a in argv]
    result = subprocess.run(
        [sys.executable, "-m", "tformer", *argv], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_help_explains_commands():
    result = subprocess.run(
        [sys.executable, "-m", "tformer", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0
    for command in ("demo", "info", "init", "tokenize", "generate"):
        assert command in result.stdout


def test_temperature_zero_is_greedy_and_empty_prompt_starts_after_end_of_text(checkpoint, capsys):
    base = ["generate", str(checkpoint), "--max-new-tokens", "6", "--json"]
    greedy = json.loads(run_cli(capsys, *base, "--prompt", "", "--greedy"))
    zero = json.loads(run_cli(capsys, *base, "--prompt", "", "--temperature", "0"))
    assert greedy["completion"] == zero["completion"] and greedy["new_tokens"] > 0


def test_stop_string_ends_the_continuation_before_it(checkpoint, capsys):
    base = ["generate", str(checkpoint), "--prompt", "Hello", "--max-new-tokens", "30"]
    full = json.loads(run_cli(capsys, *base, "--greedy", "--json"))["completion"]
    stop = full[10:14]  # a piece of text the model will produce
    assert stop and full.find(stop) >= 0
    stopped = json.loads(run_cli(capsys, *base, "--greedy", "--stop", stop, "--json"))
    assert stopped["completion"] == full[: full.find(stop)]
    streamed = run_cli(capsys, *base, "--greedy", "--stop", stop)
    assert streamed == "Hello" + full[: full.find(stop)] + "\n"


def test_repetition_penalty_changes_greedy_output(checkpoint, capsys):
    base = ["generate", str(checkpoint), "--prompt", "Hello", "--max-new-tokens", "20", "--greedy"]
    plain = json.loads(run_cli(capsys, *base, "--json"))["completion"]
    penalised = json.loads(run_cli(capsys, *base, "--repetition-penalty", "2.0", "--json"))
    assert penalised["completion"] != plain


def test_generate_batch_of_prompts_with_several_samples_as_json(checkpoint, capsys, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Hello"}\n\n{"prompt": "A longer prompt here"}\n')
    base = ["generate", str(checkpoint), "--max-new-tokens", "6", "--seed", "3", "--json"]
    batch = json.loads(run_cli(capsys, *base, "--prompts-file", str(prompts), "--num-samples", "2"))
    assert [(r["prompt_index"], r["sample"]) for r in batch["results"]] == [
        (0, 0),
        (0, 1),
        (1, 0),
        (1, 1),
    ]
    # Each sample equals generating its prompt alone with seed + sample.
    for r in batch["results"]:
        alone = base[:-3] + ["--seed", str(3 + r["sample"]), "--json", "--prompt", r["prompt"]]
        assert json.loads(run_cli(capsys, *alone))["completion"] == r["completion"]
    repeated = json.loads(run_cli(capsys, *base, "--prompt", "Hello", "--prompt", "Hi there"))
    assert [r["prompt"] for r in repeated["results"]] == ["Hello", "Hi there"]


def test_generate_reports_its_path_and_int8_runs(checkpoint, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("TFORMER_CACHE", str(tmp_path))
    # the CPU's paths (the kernels' row limits, kept per CPU), on a machine with a GPU too
    argv = ["generate", str(checkpoint), "--prompt", "Hello", "--max-new-tokens", "5"]
    argv += ["--device", "cpu"]
    main([*argv, "--quantize", "int8", "--greedy"])
    captured = capsys.readouterr()
    assert captured.out.startswith("Hello")
    assert "decoding: weights int8" in captured.err
    if kernels.load() is not None:  # where torch's matmul overtakes them: measured, kept
        kept = json.loads(next((tmp_path / "kernels").glob("*.rows.*.json")).read_text())
        assert any(" int8 at 1,512 rows" in entry for entry in kept)
        assert any(" int8 at 1 rows" in entry for entry in kept)  # the head: one row a step
    d = json.loads(run_cli(capsys, *argv, "--dtype", "bfloat16", "--json"))
    assert d["path"]["weights"] == "bfloat16" and d["new_tokens"] <= 5
    for weights in ("w8a8", "w4a8"):
        d = json.loads(run_cli(capsys, *argv, "--quantize", weights, "--json"))
        description = d["path"]["description"]
        assert d["path"]["weights"] == weights and "activations rounded to int8" in description


def test_prompts_file_errors_name_the_line(checkpoint, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt key"}\n')
    result = subprocess.run(
        [sys.executable, "-m", "tformer", "generate", str(checkpoint), "--prompts-file", str(bad)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert f'{bad}:2: expected an object with a "prompt" string' in result.stderr


def test_the_program_freezes_the_garbage_collector_s_objects_before_it_exits():
    code = (
        "import gc, sys\n"
        "from tformer.cli.main import entry\n"
        "sys.argv = ['tformer', 'info', 'gpt2', '--json']\n"
        "entry()\n"
        "print(gc.get_freeze_count() > 10_000)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "True"


def test_a_batch_that_fills_the_window_says_so_in_json_and_one_warning_line(checkpoint, capsys):
    argv = ["generate", str(checkpoint), "--prompt", "A", "--prompt", "B c d", "--json"]
    main([*argv, "--max-new-tokens", "80", "--greedy"])  # the window is 64
    captured = capsys.readouterr()
    results = json.loads(captured.out)["results"]
    assert [r["finish_reason"] for r in results] == ["context", "context"]
    assert all(r["new_tokens"] < 80 and not r["prompt_truncated"] for r in results)
    warning = captured.err.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith("tformer generate: warning: the context")
    main([*argv, "--max-new-tokens", "5"])
    captured = capsys.readouterr()
    assert [r["finish_reason"] for r in json.loads(captured.out)["results"]] == ["length"] * 2
    assert captured.err == ""


def test_a_prompt_cut_to_fit_is_one_warning_line_and_reported(checkpoint, capsys):
    argv = ["generate", str(checkpoint), "--prompt", "word " * 80, "--max-new-tokens", "3"]
    out = json.loads(run_cli(capsys, *argv, "--json"))
    assert out["prompt_truncated"] and out["finish_reason"] == "length"
    main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        "tformer generate: warning: the prompt has 81 tokens but the context window holds 64: "
        "only its last 63 are used"
    )


def test_a_batch_cut_by_a_stop_string_counts_the_tokens_kept_as_a_stream_does(checkpoint, capsys):
    base = ["generate", str(checkpoint), "--max-new-tokens", "30", "--greedy", "--json"]
    full = json.loads(run_cli(capsys, *base, "--prompt", "Hello"))["completion"]
    stop = full[10:14]  # a piece of text the model will produce
    alone = json.loads(run_cli(capsys, *base, "--prompt", "Hello", "--stop", stop))
    assert alone["finish_reason"] == "stop" and alone["new_tokens"] < 30
    batch = json.loads(
        run_cli(capsys, *base, "--prompt", "Hello", "--prompt", "Hi", "--stop", stop)
    )
    first = batch["results"][0]
    assert first["completion"] == alone["completion"] == full[: full.find(stop)]
    assert first["finish_reason"] == "stop"
    assert first["new_tokens"] == alone["new_tokens"]
    assert batch["new_tokens"] == sum(r["new_tokens"] for r in batch["results"])


def test_inspect_of_a_long_source_is_one_warning_line(tmp_path, capsys):
    from tformer.models.seq2seq import Seq2SeqConfig, Seq2SeqTransformer
    from tformer.tokenizers import train_bpe

    tokenizer = train_bpe(["one two three four"] * 4, 280, special_tokens=("<pad>", "<s>", "</s>"))
    v = tokenizer.vocab_size
    config = Seq2SeqConfig(v, v, max_len=12, d_model=16, n_heads=2, n_encoder_layers=1,
                           n_decoder_layers=1, d_ff=32, dropout=0.0)  # fmt: skip
    run = tmp_path / "untrained"
    Seq2SeqTransformer(config, seed=0).save_pretrained(run)
    tokenizer.save(run)
    argv = ["inspect", str(run), "--text", "one two three four " * 5, "--json"]
    main([*argv, "--target", "one two"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tformer inspect: warning: 1 of 1 source")
    main([*argv, "--target", "three " * 20])  # the target too
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[1].startswith("tformer inspect: warning: the target has")
    main(["inspect", str(run), "--text", "one two", "--target", "one", "--json"])
    assert capsys.readouterr().err == ""


def test_inspect_of_a_text_longer_than_the_window_is_one_warning_line(checkpoint, capsys):
    main(["inspect", str(checkpoint), "--text", "the cat sat on the mat " * 40, "--json"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tformer inspect: warning: --text is")
    main(["inspect", str(checkpoint), "--text", "the cat sat on the mat", "--json"])
    assert capsys.readouterr().err == ""
