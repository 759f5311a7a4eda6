"""tokenizer/chat.py: `render` == transformers' apply_chat_template with SmolLM2's own template and
tokenizer (from the GGUF); `jinja_template` rendered by transformers and by jinja2 == `render_text`;
templates recognised without running them (and, run by jinja2, they write what our format writes);
the book's alpaca prompt; chat.json; clear errors."""

import json

import pytest
from conftest import need

from scratchllm.common import ScratchError
from scratchllm.tokenizer import from_gpt2_files
from scratchllm.tokenizer.chat import (
    ALPACA,
    CHATML,
    FORMATS,
    LLAMA3,
    ChatFormat,
    alpaca_prompt,
    detect_chat_format,
    jinja_template,
    render,
    render_text,
    stop_ids,
)

SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello  1 2  3"}],
    [{"role": "user", "content": " leading space\n"}, {"role": "assistant", "content": "\n\nsure  \t"},
     {"role": "user", "content": "東京 🙂 e\u0301 don't\r\n42"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
     {"role": "system", "content": "late system"}, {"role": "user", "content": "z"}],
]

# Qwen2-Instruct's and Qwen2.5-Instruct's chat templates (the tool branches are ignored by detection),
# Meta's Llama 3 Instruct template, and ones we do not know.
QWEN2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
         "You are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
         "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
         "{{ '<|im_start|>assistant\n' }}{% endif %}")
QWEN25 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""
LLAMA3_META = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
               "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
               "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
               "{{ content }}{% endfor %}{% if add_generation_prompt %}"
               "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CHATML_PLAIN = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
UNKNOWN = ["", "{{ messages }}", "hello", QWEN2.replace("'<|im_end|>' + '\n'", "'<|im_end|>'"),  # no newline
           CHATML_PLAIN.replace("{% endfor %}", "{% if '<think>' in message['content'] %}x{% endif %}{% endfor %}"),
           "{{ bos_token }}" + CHATML_PLAIN,  # LFM2-style: a bos token we would not write
           "{% for m in messages %}{{ '<start_of_turn>' + m['role'] + '\n' + m['content'] | trim + '<end_of_turn>\n' }}"
           "{% endfor %}"]


def _jinja():
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        need("jinja2", "pip install jinja2 (comes with transformers)")
    return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)  # transformers' settings


def run_template(template: str, messages, add_generation_prompt: bool, **extra) -> str:
    return _jinja().from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **extra)


@pytest.fixture(scope="session")
def smol_auto(smollm2_tokenizer_folders):
    """transformers' tokenizer for the folder with SmolLM2's own tokenizer.json and the GGUF's template."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_tokenizer_folders[1])


@pytest.fixture(scope="session")
def smol_format(smollm2_metadata):
    return detect_chat_format(smollm2_metadata["tokenizer.chat_template"], "SmolLM2.gguf")


def hf_chat_ids(auto, messages, add_generation_prompt: bool, **kw) -> list[int]:
    out = auto.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt, **kw)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_detect_smollm2_from_gguf(smol_format):
    assert smol_format == ChatFormat("chatml", system_prompt=SMOL_SYSTEM, stop=("<|im_end|>",))


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("gen", [True, False])
def test_render_equals_apply_chat_template(smollm2_tokenizer, smol_auto, smol_format, messages, gen):
    assert render(smol_format, messages, smollm2_tokenizer, add_generation_prompt=gen) == hf_chat_ids(smol_auto, messages, gen)


@pytest.mark.parametrize("fmt", [CHATML, ChatFormat("chatml", "It's \"quoted\"\n{{ not jinja }} \\ end", stop=("<|im_end|>",)),
                                 ChatFormat("chatml", SMOL_SYSTEM, stop=("<|im_end|>",)), LLAMA3,
                                 ChatFormat("llama3", "  Be brief. ", "<|begin_of_text|>", LLAMA3.stop),
                                 ALPACA, ChatFormat("alpaca", None, stop=("<|endoftext|>",)),
                                 FORMATS["phi3"], ChatFormat("phi3", "Be brief.", stop=FORMATS["phi3"].stop)],
                         ids=lambda f: f"{f.name}-{bool(f.system_prompt)}")
def test_jinja_template_renders_render_text(fmt, smollm2_tokenizer, smol_auto):
    template = jinja_template(fmt)
    assert detect_chat_format(template, "ours") == fmt  # and it reads back
    convs = [[{k: v for k, v in m.items()} for m in c] for c in CONVERSATIONS]
    if fmt.name == "alpaca":
        convs = [[{"role": "user", "content": "Sum", "input": "2 3"}, {"role": "assistant", "content": "5"},
                  {"role": "user", "content": "again"}], [{"role": "system", "content": "Pre."},
                                                          {"role": "user", "content": "Do it", "input": ""}]]
    for messages in convs:
        for gen in (True, False):
            want = render_text(fmt, messages, gen)
            assert run_template(template, messages, gen) == want
            assert smol_auto.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                 add_generation_prompt=gen) == want
            if fmt.name == "chatml":  # and the ids transformers makes of it are ours
                assert hf_chat_ids(smol_auto, messages, gen, chat_template=template) == render(fmt, messages, smollm2_tokenizer, gen)


@pytest.mark.parametrize("template,fmt,extra", [
    (QWEN2, ChatFormat("chatml", "You are a helpful assistant.", stop=("<|im_end|>",)), {}),
    (QWEN25, ChatFormat("chatml", "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
                        stop=("<|im_end|>",)), {}),
    (CHATML_PLAIN, CHATML, {}),
    (LLAMA3_META, LLAMA3, {"bos_token": "<|begin_of_text|>"})], ids=["qwen2", "qwen2.5", "chatml", "llama3"])
def test_detect_known_templates(template, fmt, extra):
    """Recognised without running; run by jinja2 they write exactly what our format writes."""
    assert detect_chat_format(template, "tokenizer_config.json") == fmt
    for messages in CONVERSATIONS:
        for gen in (True, False):
            assert run_template(template, messages, gen, **extra) == render_text(fmt, messages, gen)


def test_unknown_templates():
    for template in UNKNOWN:
        assert detect_chat_format(template, "x.gguf") is None, template
    assert detect_chat_format(None, "x.gguf") is None
    with pytest.raises(ScratchError, match="x.gguf: the chat template must be a string, got a list"):
        detect_chat_format(["a"], "x.gguf")


def test_special_token_text_in_content_stays_text(smollm2_tokenizer, smol_auto, smol_format):
    """Our choice: a user typing <|im_end|> does not end the turn (HF would make it the special token)."""
    messages = [{"role": "user", "content": "a<|im_end|>b"}]
    ours, hf = render(smol_format, messages, smollm2_tokenizer), hf_chat_ids(smol_auto, messages, True)
    im_end = smollm2_tokenizer.special_tokens["<|im_end|>"]
    assert ours.count(im_end) == hf.count(im_end) - 1 == 2  # (the system turn's and the user turn's)
    assert smollm2_tokenizer.decode(ours) == render_text(smol_format, messages)


@pytest.fixture(scope="module")
def gpt2(shared_data):
    return from_gpt2_files(shared_data / "gpt2" / "encoder.json", shared_data / "gpt2" / "vocab.bpe")


def test_stop_ids(smollm2_tokenizer, gpt2):
    assert stop_ids(CHATML, smollm2_tokenizer) == [2] and stop_ids(ALPACA, smollm2_tokenizer) == [0] and stop_ids(LLAMA3, smollm2_tokenizer) == []
    assert stop_ids(ALPACA, gpt2) == [50256] and stop_ids(CHATML, gpt2) == []
    with pytest.raises(ScratchError, match="chatml chat format needs the special token '<\\|im_start\\|>'"):
        render(CHATML, [{"role": "user", "content": "hi"}], gpt2)


def test_alpaca_is_the_books_format(shared_data, gpt2, gpt2_tiktoken):
    """render / alpaca_prompt == the book's ch. 7 format_input + response (+ <|endoftext|> when training)."""
    def format_input(entry):  # the book's function, as printed in ch. 7
        instruction_text = (f"Below is an instruction that describes a task. "
                            f"Write a response that appropriately completes the request."
                            f"\n\n### Instruction:\n{entry['instruction']}")
        input_text = f"\n\n### Input:\n{entry['input']}" if entry["input"] else ""
        return instruction_text + input_text

    data = json.loads((shared_data / "instruction-data.json").read_text(encoding="utf-8"))
    assert any(e["input"] for e in data[:50]) and any(not e["input"] for e in data[:50])
    for e in data[:50]:
        full = format_input(e) + f"\n\n### Response:\n{e['output']}"
        messages = [{"role": "user", "content": e["instruction"], "input": e["input"]},
                    {"role": "assistant", "content": e["output"]}]
        assert alpaca_prompt(e["instruction"], e["input"]) == format_input(e) + "\n\n### Response:\n"
        assert render_text(ALPACA, messages[:1], add_generation_prompt=False) == format_input(e)
        assert render(ALPACA, messages, gpt2, add_generation_prompt=False) == gpt2_tiktoken.encode(full) + [50256]
    assert render_text(ALPACA, [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]) == \
        "Be terse.\n\n### Instruction:\nHi\n\n### Response:\n"


def test_chat_json_round_trip_and_errors():
    for fmt in [*FORMATS.values(), ChatFormat("chatml", SMOL_SYSTEM, stop=("<|im_end|>", "<|endoftext|>"))]:
        assert ChatFormat.from_dict(json.loads(json.dumps(fmt.to_dict())), "chat.json") == fmt
    assert ChatFormat.from_dict({"name": "llama3"}) == LLAMA3
    cases = [({"name": "vicuna"}, "m/chat.json: field 'name' is 'vicuna'; expected one of chatml, llama3, alpaca"),
             ({"name": "chatml", "template": "x"}, "m/chat.json: unknown field\\(s\\) \\['template'\\]"),
             ({"name": "chatml", "stop": "<|im_end|>"}, "m/chat.json: field 'stop' must be a list"),
             ({"name": "chatml", "system_prompt": 3}, "m/chat.json: chat format chatml: system_prompt must be a string"),
             ({"name": "alpaca", "stop": []}, "alpaca: stop needs at least one"),
             (["chatml"], "m/chat.json: expected an object")]
    for d, message in cases:
        with pytest.raises(ScratchError, match=message):
            ChatFormat.from_dict(d, "m/chat.json")


def test_bad_messages(smollm2_tokenizer):
    cases = [(CHATML, [], "non-empty list"), (CHATML, "hi", "non-empty list"),
             (CHATML, [{"role": "user", "content": "a"}, "b"], "message 1: expected an object"),
             (CHATML, [{"role": "tool", "content": "a"}], "message 0: field 'role' is 'tool'; expected one of system"),
             (CHATML, [{"role": "user"}], "message 0 \\(user\\): field 'content' must be a string, got None"),
             (CHATML, [{"role": "user", "content": ["a"]}], "field 'content' must be a string"),
             (CHATML, [{"role": "user", "content": "a", "name": "bob"}], "message 0: unknown field\\(s\\) \\['name'\\]"),
             (CHATML, [{"role": "user", "content": "a", "input": "b"}], "unknown field\\(s\\) \\['input'\\]"),
             (ALPACA, [{"role": "user", "content": "a", "input": 3}], "message 0 \\(user\\): field 'input' must be"),
             (ALPACA, [{"role": "assistant", "content": "a"}], "message 0: field 'role' is 'assistant' but the alpaca"),
             (ALPACA, [{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
                       {"role": "user", "content": "b"}], "message 2: field 'role' is 'user' but the alpaca format needs 'assistant'"),
             (ALPACA, [{"role": "system", "content": "s"}], "needs a user message")]
    for fmt, messages, message in cases:
        with pytest.raises(ScratchError, match=message):
            render(fmt, messages, smollm2_tokenizer)
