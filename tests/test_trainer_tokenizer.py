"""The trainer's tokenizer and chat template against hand-written expectations."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from trainer.errors import TrainerError
from trainer.tokenization import IGNORE, ChatTokenizer, TokenizerConfig, tokenizer, train_bpe

TEXTS = ["What colour is the moving object?", "The object is red.", "And the shape?", "It is a circle."] * 5


@pytest.fixture(scope="module")
def tok() -> ChatTokenizer:
    return ChatTokenizer(train_bpe(TEXTS, vocab_size=300))


def test_loss_mask_of_a_multi_turn_conversation(tok):
    conversation = [
        {"role": "user", "content": "<video>\nWhat colour?"},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "And the shape?"},
        {"role": "assistant", "content": "A circle."},
    ]
    # (piece, learned?) exactly as the template must lay the conversation out
    expected = [
        ("<|im_start|>", False), ("user\n", False), ("<|video|>", False), ("<|video|>", False), ("<|video|>", False),
        ("\n", False), ("What colour?", False), ("<|im_end|>", False), ("\n", False),
        ("<|im_start|>", False), ("assistant\n", False), ("Red.", True), ("<|im_end|>", True), ("\n", False),
        ("<|im_start|>", False), ("user\n", False), ("And the shape?", False), ("<|im_end|>", False), ("\n", False),
        ("<|im_start|>", False), ("assistant\n", False), ("A circle.", True), ("<|im_end|>", True), ("\n", False),
    ]
    specials = {"<|im_start|>", "<|im_end|>", "<|video|>"}
    pieces = [[tok.tok.token_to_id(p)] if p in specials else tok.tok.encode(p, add_special_tokens=False).ids
              for p, _ in expected]
    ids = [t for piece in pieces for t in piece]
    labels = [t if learned else IGNORE for piece, (_, learned) in zip(pieces, expected) for t in piece]

    enc = tok.encode_conversation(conversation, n_video_tokens=3)
    assert enc.input_ids == ids
    assert enc.labels == labels
    learned_text = tok.tok.decode([t for t in enc.labels if t != IGNORE], skip_special_tokens=False)
    assert learned_text == "Red.<|im_end|>A circle.<|im_end|>"

    prompt = tok.encode_prompt(conversation[:3], n_video_tokens=3)
    assert prompt == [t for piece in pieces[:-3] for t in piece]  # up to "<|im_start|>assistant\n"


def test_system_prompt_and_text_only(tok):
    conversation = [{"role": "user", "content": "<video>\nHi"}, {"role": "assistant", "content": "Hello."}]
    enc = tok.encode_conversation(conversation, n_video_tokens=0, system="Be brief.")
    text = tok.tok.decode(enc.input_ids, skip_special_tokens=False)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\nHello.<|im_end|>\n")
    assert tok.video_id not in enc.input_ids


def test_text_never_becomes_a_special_token(tok):
    conversation = [{"role": "user", "content": "<video>\nsay <|im_end|> and <|video|>"},
                    {"role": "assistant", "content": "ok <|im_end|>"}]
    enc = tok.encode_conversation(conversation, n_video_tokens=2)
    assert enc.input_ids.count(tok.video_id) == 2
    assert enc.input_ids.count(tok.im_end_id) == 2  # one per turn, none from the text


def test_loaded_tokenizer_gets_the_video_token_and_needs_chatml(tmp_path):
    bpe = train_bpe(TEXTS, vocab_size=300)
    bpe_without_video = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "<|im_start|>": 2, "<|im_end|>": 3}, merges=[]))
    bpe_without_video.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe_without_video.save(str(tmp_path / "plain.json"))
    loaded = ChatTokenizer.load(tmp_path / "plain.json")
    assert loaded.video_id == 4 and loaded.vocab_size == 5

    no_chat = Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
    no_chat.save(str(tmp_path / "nochat.json"))
    with pytest.raises(TrainerError, match="im_start"):
        ChatTokenizer.load(tmp_path / "nochat.json")
    with pytest.raises(TrainerError, match="no tokenizer.json"):
        ChatTokenizer.load(tmp_path)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(TrainerError, match="not a Hugging Face tokenizer"):
        ChatTokenizer.load(tmp_path / "bad.json")

    ChatTokenizer(bpe).save(tmp_path / "dir")
    assert ChatTokenizer.load(tmp_path / "dir").video_id == 3  # a directory holding tokenizer.json


def test_tokenizer_command_is_deterministic(tmp_path):
    from trainer_helpers import make_manifest

    manifest = make_manifest(tmp_path)
    first = tokenizer(TokenizerConfig(manifest=manifest, out=tmp_path / "a", vocab_size=400))
    second = tokenizer(TokenizerConfig(manifest=manifest, out=tmp_path / "b", vocab_size=400))
    assert first.read_bytes() == second.read_bytes()
    vocab = json.loads(first.read_text())["model"]["vocab"]
    assert [vocab.get(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|video|>")] == [0, 1, 2, 3]
