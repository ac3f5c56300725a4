"""The OpenAI request schema the server accepts (pydantic), and the checks past the schema.

Unknown fields are accepted and ignored, as OpenAI-compatible servers do (clients send `user`,
`metadata`, ...); fields that would change the answer and that kvtrt cannot honour (n > 1,
logprobs, echo, tools, penalties) are refused with a 400 naming the field, never silently dropped."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from .errors import bad_request


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")


class ContentPart(_Model):
    type: StrictStr
    text: Optional[StrictStr] = None


class ChatMessage(_Model):
    role: StrictStr
    content: Union[StrictStr, list[ContentPart], None] = None
    name: Optional[StrictStr] = None


class StreamOptions(_Model):
    include_usage: Optional[StrictBool] = False


class _Sampling(_Model):
    model: Optional[StrictStr] = None
    max_tokens: Optional[StrictInt] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    top_k: Optional[StrictInt] = Field(None, ge=-1, description="kvtrt/vLLM extension: 0 or -1 = off")
    seed: Optional[StrictInt] = None
    stop: Union[StrictStr, list[StrictStr], None] = None
    stream: Optional[StrictBool] = False
    stream_options: Optional[StreamOptions] = None
    n: Optional[StrictInt] = Field(1, ge=1)
    kv: Optional[StrictStr] = Field(None, description="kvtrt extension: a KV spec for this request")
    logprobs: Union[StrictBool, StrictInt, None] = None
    presence_penalty: Optional[float] = 0.0
    frequency_penalty: Optional[float] = 0.0
    # vLLM's sampling extensions, passed to the scheduler when given
    repetition_penalty: Optional[float] = Field(None, gt=0.0)
    min_tokens: Optional[StrictInt] = Field(None, ge=0)
    ignore_eos: Optional[StrictBool] = None

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return tuple(s for s in stops if s)

    def check_supported(self) -> None:
        if (self.n or 1) != 1:
            raise bad_request(f"n={self.n}: only n=1 is supported (send n requests instead)", param="n",
                              code="unsupported_value")
        if self.logprobs:
            raise bad_request("logprobs are not supported by kvtrt serve", param="logprobs", code="unsupported_value")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise bad_request(f"{name} is not supported by kvtrt serve (send 0 or omit it)", param=name,
                                  code="unsupported_value")


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: Optional[StrictInt] = Field(None, ge=1)
    tools: Optional[list[Any]] = None
    top_logprobs: Optional[StrictInt] = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.tools:
            raise bad_request("tools are not supported by kvtrt serve", param="tools", code="unsupported_value")
        if self.top_logprobs:
            raise bad_request("top_logprobs is not supported by kvtrt serve", param="top_logprobs",
                              code="unsupported_value")

    def limit(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def chat_messages(self) -> list[dict[str, str]]:
        """Messages for the chat template: text parts joined, other parts refused."""
        out = []
        for i, message in enumerate(self.messages):
            content = message.content
            if isinstance(content, list):
                texts = []
                for j, part in enumerate(content):
                    if part.type != "text" or part.text is None:
                        raise bad_request(f"messages[{i}].content[{j}]: only text parts are supported "
                                          f"(got type {part.type!r})", param=f"messages.{i}.content.{j}.type",
                                          code="unsupported_value")
                    texts.append(part.text)
                content = "\n".join(texts)
            out.append({"role": message.role, "content": content or ""})
        return out


class CompletionRequest(_Sampling):
    prompt: Union[StrictStr, list[StrictInt], list[StrictStr], list[list[StrictInt]]]
    echo: Optional[StrictBool] = False
    best_of: Optional[StrictInt] = None
    suffix: Optional[StrictStr] = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise bad_request("echo is not supported by kvtrt serve", param="echo", code="unsupported_value")
        if self.best_of not in (None, 1):
            raise bad_request(f"best_of={self.best_of}: only 1 is supported", param="best_of",
                              code="unsupported_value")
        if self.suffix:
            raise bad_request("suffix is not supported by kvtrt serve", param="suffix", code="unsupported_value")

    def limit(self) -> Optional[int]:
        return self.max_tokens

    def single_prompt(self) -> Union[str, list[int]]:
        """The one prompt of the request (text or token ids); a batch of several is refused (n=1 only)."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise bad_request(f"prompt holds {len(prompt)} prompts; send one prompt per request",
                                  param="prompt", code="unsupported_value")
            prompt = prompt[0]
        if len(prompt) == 0:
            raise bad_request("prompt is empty", param="prompt", code="invalid_value")
        return prompt


Endpoint = Literal["chat", "completion"]
