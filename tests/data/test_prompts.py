"""Prompt/response pairs: the loss is on the response tokens only."""

import json

import pytest
import torch

from tformer import GPT2, GPT2Config
from tformer.data.prompts import (
    PromptBatches,
    PromptResponse,
    encode_pairs,
    read_prompt_responses,
)
from tformer.data.tokens import IGNORE_INDEX
from tformer.tokenizers import CharTokenizer
from tformer.train.trainer import cross_entropy


def test_only_the_response_is_scored():
    tokenizer = CharTokenizer.from_text("abcxyz")
    examples, counts = encode_pairs([PromptResponse("ab", "xyz")], tokenizer, max_len=8)
    (example,) = examples
    x, y = example.inputs_and_targets()
    encode = tokenizer.encode
    # the sequence a b x y z: reading a, predicting b (prompt) is not scored; reading b
    # predicts x, the response's first token
    assert x == encode("abxy")
    assert y == [IGNORE_INDEX, *encode("xyz")]
    assert counts == {"cut": 0, "left_out": 0}


def test_long_pairs_are_cut_and_prompts_that_fill_the_window_left_out():
    tokenizer = CharTokenizer.from_text("abcdefgh")
    pairs = [PromptResponse("abc", "defgh"), PromptResponse("abcdef", "g")]
    examples, counts = encode_pairs(pairs, tokenizer, max_len=4)
    assert counts == {"cut": 1, "left_out": 1}
    x, y = examples[0].inputs_and_targets()
    assert x == tokenizer.encode("abcd") and y == [IGNORE_INDEX] * 2 + tokenizer.encode("de")


def test_the_batch_loss_is_the_response_tokens_mean_negative_log_likelihood():
    tokenizer = CharTokenizer.from_text("abcdefgh")
    pairs = [PromptResponse("abc", "de"), PromptResponse("h", "gfedc")]
    examples, _ = encode_pairs(pairs, tokenizer, max_len=8)
    batch = PromptBatches(examples, pad_id=0).collate(examples)
    config = GPT2Config(
        vocab_size=tokenizer.vocab_size, max_len=8, d_model=16, n_layers=1, n_heads=2
    )
    model = GPT2(config, seed=0).eval()
    logits = model(*batch.inputs)
    # by hand: sequence by sequence, unpadded, each response token given what precedes it
    nll = []
    for pair in pairs:
        prompt, response = tokenizer.encode(pair.prompt), tokenizer.encode(pair.response)
        ids = torch.tensor([prompt + response])
        log_probs = model(ids).log_softmax(-1)[0]
        for j in range(len(response)):
            position = len(prompt) + j
            nll.append(-log_probs[position - 1, ids[0, position]])
    assert len(nll) == 7
    expected = torch.stack(nll).mean()
    torch.testing.assert_close(cross_entropy(logits, batch.targets), expected, rtol=1e-5, atol=1e-6)


def test_bad_files_name_the_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n" + '{"prompt": "a"}\n')
    with pytest.raises(
        ValueError, match=r":2: expected an object with \"prompt\" and \"response\" non-empty"
    ):
        read_prompt_responses(path)
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match=":1: not valid JSON"):
        read_prompt_responses(path)
    path.write_text("\n")
    with pytest.raises(ValueError, match="no prompt/response pairs"):
        read_prompt_responses(path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_prompt_responses(tmp_path / "missing.jsonl")
