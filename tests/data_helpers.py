"""Builders shared by the data tests: tiny image files, LLaVA JSON files, tokenizer files and a TFDS dataset."""
import io
import json

import numpy as np
from PIL import Image

TOKENIZER_TEXT = [
    "What is in the picture? A red circle. Is it big? Yes, it is big.",
    "What color is the square? blue. How many shapes are there? two. Where is the green triangle? left.",
    "USER: ASSISTANT: system user assistant You are a helpful assistant.",
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions.",
]
TEMPLATE_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def png_bytes(size=(8, 8), color=(200, 30, 30), mode="RGB", fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, fmt)
    return buffer.getvalue()


def write_image(path, size=(8, 8), color=(200, 30, 30), mode="RGB", fmt="PNG") -> str:
    with open(path, "wb") as f:
        f.write(png_bytes(size, color, mode, fmt))
    return str(path)


def record(example_id, question="What color is it?", answer="red", image="img.png"):
    """A LLaVA JSON record with one image (image=None: text only)."""
    result = {"id": example_id, "conversations": [
        {"from": "human", "value": ("<image>\n" if image else "") + question}, {"from": "gpt", "value": answer}]}
    if image:
        result["image"] = image
    return result


def write_json(path, records, jsonl=False) -> str:
    with open(path, "w") as f:
        if jsonl:
            f.write("".join(json.dumps(r) + "\n" for r in records))
        else:
            json.dump(records, f)
    return str(path)


def image_dataset(tmp_path, num, size=(12, 8)) -> str:
    """tmp_path/data.json with `num` one-image records ("s0", "s1", ...), each image a distinct colour."""
    records = []
    for i in range(num):
        write_image(tmp_path / f"img{i}.png", size, (10 * i % 256, 100, 200))
        records.append(record(f"s{i}", f"Question {i}?", f"answer {i}", f"img{i}.png"))
    return write_json(tmp_path / "data.json", records)


def train_hf_tokenizer(path, specials=("<unk>", "<s>", "</s>", "<pad>", *TEMPLATE_SPECIALS), vocab_size=320) -> str:
    """A byte-level BPE tokenizer.json (exact round trip of any text) with the given special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(TOKENIZER_TEXT, trainer)
    tokenizer.save(str(path))
    return str(path)


def image_id_of(tokenizer_json) -> int:
    """The id "<image>" gets when it is added to a tokenizer.json: the next free one."""
    from transformers import PreTrainedTokenizerFast
    return len(PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json)))


def train_wordlevel_tokenizer(path) -> str:
    """A word-level tokenizer.json that maps unseen words to [UNK] (cannot round-trip arbitrary text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordLevelTrainer(special_tokens=["[UNK]", "<s>", "</s>", "<pad>"], show_progress=False)
    tokenizer.train_from_iterator(["What is in the picture", "USER ASSISTANT"], trainer)
    tokenizer.save(str(path))
    return str(path)


def train_sentencepiece(tmp_path) -> str:
    """A tiny sentencepiece BPE model with <pad> and the chat templates' tokens as control symbols."""
    import sentencepiece
    text_file = tmp_path / "sp_text.txt"
    text_file.write_text("\n".join(TOKENIZER_TEXT * 20))
    prefix = str(tmp_path / "sp")
    sentencepiece.SentencePieceTrainer.train(
        input=str(text_file), model_prefix=prefix, vocab_size=120, model_type="bpe", character_coverage=1.0,
        pad_id=3, control_symbols=TEMPLATE_SPECIALS, minloglevel=2)
    return prefix + ".model"


def build_tfds(data_dir, train=6, test=3, image_size=(10, 6)) -> str:
    """Prepares the array_record TFDS dataset "tiny_vqa" (image, question, answer) under data_dir."""
    import tensorflow_datasets as tfds

    class TinyVqa(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)), "question": tfds.features.Text(),
                "answer": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(train), "test": self._generate_examples(test, offset=100)}

        def _generate_examples(self, num, offset=0):
            for i in range(offset, offset + num):
                yield i, {"image": png_bytes(image_size, (i % 256, 50, 50)), "question": f"Question {i}?",
                          "answer": f"answer {i}"}

    TinyVqa(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return "tiny_vqa"


def image_token_counts(batch, image_token_id):
    return (np.asarray(batch["input_ids"]) == image_token_id).sum(axis=1)


def close(iterator):
    if hasattr(iterator, "close"):
        iterator.close()


def ids_of(batch):
    return [sample_id for row in batch["_ids"] for sample_id in json.loads(str(row))]


def take(iterator, n):
    """The next `n` batches of an iterator."""
    return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
    """Two lists of batches hold the same keys and bitwise-equal arrays."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def assert_restores_mid_stream(config):
    """The train iterator of `config`, restored from its state after 3 batches, gives the same next 2 batches."""
    from llava_jax.data.pipeline import make_train_iterator
    iterator = make_train_iterator(config)
    take(iterator, 3)
    state = iterator.get_state()
    expected = take(iterator, 2)
    close(iterator)
    resumed = make_train_iterator(config)
    resumed.set_state(state)
    got = take(resumed, 2)
    close(resumed)
    assert_same_batches(got, expected)
