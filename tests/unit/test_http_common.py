import json

import pytest

from unsafechain.backends.base import MalformedResponse
from unsafechain.backends.http_common import parse_chat_completion


def _body(*messages):
    return json.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "choices": [
                {"index": i, "message": {"role": "assistant", **m}, "finish_reason": "stop"}
                for i, m in enumerate(messages)
            ],
        }
    ).encode()


def test_reasoning_returned_apart_by_a_reasoning_parser_is_put_back_in_think_tags():
    body = _body(
        {"content": "Paris.", "reasoning_content": "The capital is Paris."},
        {"content": "Paris.", "reasoning": "Newer vLLM name."},
        {"content": "No reasoning."},
    )
    texts = [g.text for g in parse_chat_completion(body, n=3, logprobs=False, where="test")]
    assert texts == [
        "<think>\nThe capital is Paris.\n</think>\n\nParis.",
        "<think>\nNewer vLLM name.\n</think>\n\nParis.",
        "No reasoning.",
    ]


def test_wrong_number_of_choices_is_a_malformed_response():
    with pytest.raises(MalformedResponse, match="2 were asked"):
        parse_chat_completion(_body({"content": "a"}), n=2, logprobs=False, where="test")
