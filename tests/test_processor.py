import torch
from PIL import Image

from dynllava.model.sparse_llama import IMAGE_PLACEHOLDER
from dynllava.runtime.processor import chat_prompt, expand_to_square, preprocess_image, tokenize_prompt


def test_vicuna_v1_template_matches_llava():
    # LLaVA-1.5's conv_vicuna_v1 (SeparatorStyle.TWO, sep " ", sep2 "</s>"), with the image before the question.
    system = ("A chat between a curious human and an artificial intelligence assistant. "
              "The assistant gives helpful, detailed, and polite answers to the human's questions.")
    assert chat_prompt([("user", "What is this?")], has_image=True) == \
        f"{system} USER: <image>\nWhat is this? ASSISTANT:"
    assert chat_prompt([("user", "Hi"), ("assistant", "Hello."), ("user", "Bye")], has_image=False) == \
        f"{system} USER: Hi ASSISTANT: Hello.</s>USER: Bye ASSISTANT:"


def test_tokenize_prompt_places_one_image_placeholder(loaded):
    tok = loaded.tokenizer
    ids = tokenize_prompt(tok, "before <image>\nafter")
    at = ids.index(IMAGE_PLACEHOLDER)
    assert ids.count(IMAGE_PLACEHOLDER) == 1 and ids[0] == tok.bos_token_id
    assert ids[:at] == tok("before ")["input_ids"]  # BOS only on the first chunk
    assert ids[at + 1:] == tok("\nafter", add_special_tokens=False)["input_ids"]


def test_pad_to_square_with_the_mean_colour(loaded):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    mean = tuple(int(x * 255) for x in loaded.image_processor.image_mean)  # (122, 116, 104) for CLIP
    square = expand_to_square(img, mean)
    assert square.size == (40, 40)
    assert square.getpixel((0, 0)) == mean and square.getpixel((20, 20)) == (255, 0, 0)
    px = preprocess_image(loaded.image_processor, img, "pad")
    assert px.shape == (3, 64, 64)
    # the padded border normalizes to ~0 (it is the mean colour); the red band does not
    assert px[:, 0, 32].abs().max() < 0.02 and px[0, 32, 32] > 1.0
    assert not torch.equal(px, preprocess_image(loaded.image_processor, img, "square"))
