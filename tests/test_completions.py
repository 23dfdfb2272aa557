"""OpenAI's completions protocol (completions.py) without a server or a model: request checks,
stop strings, and the response shapes."""

import json

import pytest

from completions import DONE, APIError, Completion, parse_completion
from engine import Output
from tokenizer import EOT_TOKEN, gpt2_tokenizer

ENC = gpt2_tokenizer()


def parse(**body):
    return parse_completion(body, ENC, block_size=32, vocab_size=ENC.n_vocab)


def test_prompts_in_every_form_become_token_ids():
    ids = ENC.encode_ordinary("hello")
    assert parse(prompt="hello").prompts == [ids]
    assert parse(prompt=["hello", ""]).prompts == [ids, [EOT_TOKEN]]
    assert parse(prompt=["hello", ""]).shown == [True, False]
    assert parse(prompt=[1, 2]).prompts == [[1, 2]]
    assert parse(prompt=[[1], [2, 3]]).prompts == [[1], [2, 3]]


@pytest.mark.parametrize("body, param", [
    ({}, "prompt"),
    ({"prompt": [ENC.n_vocab]}, "prompt"),
    ({"prompt": "x", "max_tokens": 40}, "max_tokens"),
    ({"prompt": "x", "temperature": 3}, "temperature"),
    ({"prompt": "x", "top_k": -2}, "top_k"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "stop": ["a"] * 5}, "stop"),
    ({"prompt": "x", "logprobs": 6}, "logprobs"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "suffix": "y"}, "suffix"),
])
def test_a_bad_field_is_a_400_naming_it(body, param):
    with pytest.raises(APIError) as err:
        parse_completion(body, ENC, block_size=32, vocab_size=ENC.n_vocab)
    assert err.value.status == 400 and err.value.param == param
    error = err.value.body()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_settings_reach_the_sampling_params():
    req = parse(prompt="x", max_tokens=5, temperature=0, top_k=3, top_p=0.5, seed=7, logprobs=2, echo=True, n=2)
    p = req.params
    assert (p.max_tokens, p.temperature, p.top_k, p.top_p, p.seed, p.logprobs) == (5, 0.0, 3, 0.5, 7, 2)
    assert p.prompt_logprobs and p.stop_token_ids == (EOT_TOKEN,) and req.n == 2


def feed(choice, text):
    for token in ENC.encode_ordinary(text):
        if choice.add(Output(token)):
            return True
    return False


def test_a_stop_string_cuts_the_text_and_a_possible_start_is_held_back():
    answer = Completion(parse(prompt="x", stop=["END"]), ENC, "m")
    choice = answer.choices[0]
    assert not feed(choice, "hello E")
    assert choice.ready() == "hello "  # "E" could start "END": held back
    assert feed(choice, "ND more")
    assert choice.text == "hello " and choice.finish_reason == "stop"


def test_the_whole_body_and_a_stream_carry_the_same_text_and_usage():
    req = parse(prompt=["a", "b"], n=2, logprobs=1)
    answer = Completion(req, ENC, "m")
    for choice in answer.choices:
        choice.add(Output(ENC.encode_ordinary(" hi")[0], logprob=-0.5, top_logprobs=[(1, -0.1)]))
        choice.finish("length")
    body = answer.body([None] * 4, completion_tokens=4)
    assert body["object"] == "text_completion" and body["model"] == "m" and body["id"] == answer.id
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert {c["text"] for c in body["choices"]} == {" hi"}
    assert body["choices"][0]["logprobs"]["token_logprobs"] == [-0.5]
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}
    event = answer.piece(answer.choices[0], True)
    assert event.startswith("data: ") and event.endswith("\n\n")
    chunk = json.loads(event[len("data: "):])
    assert chunk["choices"][0]["text"] == " hi" and chunk["choices"][0]["finish_reason"] == "length"
    assert answer.piece(answer.choices[0], False) is None  # nothing new
    assert DONE == "data: [DONE]\n\n"


def test_echo_of_an_empty_prompt_is_empty():
    answer = Completion(parse(prompt="", echo=True, logprobs=0), ENC, "m")
    text, lp = answer.echo(answer.choices[0], None)
    assert text == "" and lp == {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
