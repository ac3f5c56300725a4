"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with the right HTTP status.

Every failure the server reports goes through `APIError`, so clients (the `openai` package raises
`BadRequestError`, `RateLimitError`, `AuthenticationError`, ... from the status) see one shape."""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """An error answered to the client. `status` is the HTTP status, `type`/`code`/`param` OpenAI's fields."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def context_length_exceeded(message: str, param: str = "messages") -> APIError:
    return APIError(400, message, param=param, code="context_length_exceeded")


def queue_full(message: str, retry_after_s: int = 1) -> APIError:
    return APIError(429, message, type="rate_limit_error", code="queue_full",
                    headers={"Retry-After": str(max(1, int(retry_after_s)))})


def unauthorized(message: str = "Incorrect or missing API key: send `Authorization: Bearer <key>` with the key "
                                 "the server was started with (--api-key).") -> APIError:
    return APIError(401, message, type="authentication_error", code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"})


def model_not_found(model: str, served: str) -> APIError:
    return APIError(404, f"The model `{model}` does not exist; this server serves `{served}` (GET /v1/models).",
                    param="model", code="model_not_found")


def not_ready(message: str = "the model is still loading; retry when GET /health answers 200") -> APIError:
    return APIError(503, message, type="server_error", code="model_not_ready", headers={"Retry-After": "1"})


def internal(message: str) -> APIError:
    return APIError(500, message, type="server_error", code="internal_error")


def from_validation(errors: list[dict]) -> APIError:
    """A 400 for a pydantic / FastAPI validation failure, naming the first offending field."""
    if not errors:
        return bad_request("the request body is invalid")
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part not in ("body",)]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind in ("json_invalid", "value_error.jsondecode") or (not loc and "json" in str(first.get("msg", "")).lower()):
        return bad_request(f"malformed JSON body: {first.get('msg', '')}".rstrip(": "), code="invalid_json")
    message = f"{param}: {first.get('msg', 'invalid value')}" if param else str(first.get("msg", "invalid body"))
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return bad_request(message, param=param, code="invalid_value" if param else "invalid_body")
