"""`kvtrt loadtest URL`: drive any OpenAI-compatible server with streaming haystack prompts.

For each concurrency level, `--requests` requests (or as many as fit in `--duration` seconds) are
sent by that many concurrent clients, each streaming (`stream: true`, usage requested). Per request:
time to first token (first content chunk), inter-token latencies (gaps between content chunks),
end-to-end latency, prompt and output tokens (the server's `usage`, else chunks and characters).
Per level: aggregate output tok/s over the level's wall time, request/s, p50/p99 of each latency,
and the errors. Prompts are distinct slices of the haystack essays (no two share a prefix, so no
server can answer from a prefix cache), sized to `--prompt-tokens` by asking the server how many
tokens a calibration prompt holds (its `usage`), else at ~4 characters per token.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

QUESTION = "\n\nSummarize the text above in a few sentences."
RSS_SAMPLE_S = 10.0  # seconds between samples of the server's RSS (--server-pid)
RSS_BASELINE_REQUESTS = 50  # the soak's drift is measured from the first sample after this many requests


@dataclass
class Record:
    """One request as the client saw it."""

    ok: bool
    status: int | None = None
    error: str | None = None
    prompt_tokens: int | None = None
    output_tokens: int = 0
    chunks: int = 0
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    e2e_s: float | None = None
    start: float = 0.0
    end: float = 0.0
    finish_reason: str | None = None


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between closest ranks; None when empty."""
    data = sorted(v for v in values if v is not None and not math.isnan(v))
    if not data:
        return None
    if len(data) == 1:
        return float(data[0])
    rank = (len(data) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(data) - 1)
    return float(data[low] + (data[high] - data[low]) * (rank - low))


def summarize(records: list[Record], concurrency: int, wall_s: float, label: str | None = None) -> dict[str, Any]:
    """A level's row: throughput over the wall time, latency percentiles over the successful requests."""
    good = [r for r in records if r.ok]
    out_tokens = sum(r.output_tokens for r in good)
    ttft = [r.ttft_s for r in good if r.ttft_s is not None]
    itl = [gap for r in good for gap in r.itl_s]
    e2e = [r.e2e_s for r in good if r.e2e_s is not None]
    tpot = [(r.e2e_s - r.ttft_s) / (r.output_tokens - 1) for r in good
            if r.output_tokens > 1 and r.e2e_s is not None and r.ttft_s is not None]
    prompt = [r.prompt_tokens for r in good if r.prompt_tokens is not None]
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            key = f"{r.status or 'error'}: {(r.error or '')[:120]}"
            errors[key] = errors.get(key, 0) + 1
    row: dict[str, Any] = {
        "concurrency": concurrency, "requests": len(records), "ok": len(good), "errors": len(records) - len(good),
        "wall_s": wall_s, "output_tokens": out_tokens,
        "throughput_tok_s": out_tokens / wall_s if wall_s > 0 else 0.0,
        "request_per_s": len(good) / wall_s if wall_s > 0 else 0.0,
        "mean_prompt_tokens": sum(prompt) / len(prompt) if prompt else None,
        "mean_output_tokens": out_tokens / len(good) if good else None,
    }
    for name, values in (("ttft", ttft), ("itl", itl), ("e2e", e2e), ("tpot", tpot)):
        row[f"{name}_p50_s"] = percentile(values, 50)
        row[f"{name}_p99_s"] = percentile(values, 99)
    row["error_kinds"] = errors
    if label is not None:
        row["label"] = label
    return row


# -- prompts ------------------------------------------------------------------------------------
def haystack_text(min_chars: int, path: str | None = None) -> str:
    """The haystack essays joined (repeated when short), else generated filler when there are none."""
    text = ""
    try:
        from .texts import load_texts

        text = "\n\n".join(t for _, t in load_texts(path))
    except FileNotFoundError:
        if path:
            raise
    if not text.strip():
        words = ("the startup founders build products users want while investors judge markets and teams learn "
                 "from mistakes that compound over years of work").split()
        rng = random.Random(0)
        text = " ".join(rng.choice(words) for _ in range(max(min_chars // 5, 1000)))
    while len(text) < min_chars:
        text += "\n\n" + text
    return text


class Prompts:
    """Distinct haystack slices, each followed by the same question: `chars` characters of essay."""

    def __init__(self, text: str, tokens: int, chars_per_token: float = 4.0):
        self.text = text
        self.tokens = tokens
        self.chars = max(1, int(tokens * chars_per_token) - len(QUESTION))

    def get(self, index: int, chars: int | None = None) -> str:
        chars = self.chars if chars is None else max(1, chars)
        span = max(1, len(self.text) - chars)
        start = (index * 7919 * 61) % span  # spread the slices over the whole text
        space = self.text.find(" ", start)  # start at a word boundary
        start = space + 1 if 0 <= space < start + 50 else start
        return self.text[start:start + chars] + QUESTION


# -- client -------------------------------------------------------------------------------------
def _body(endpoint: str, model: str | None, prompt: str, max_tokens: int, stream: bool, ignore_eos: bool) -> dict:
    body: dict[str, Any] = {"max_tokens": max_tokens, "temperature": 0.0, "stream": stream}
    if model:
        body["model"] = model
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if stream:
        body["stream_options"] = {"include_usage": True}
    if ignore_eos:
        body["ignore_eos"] = True
    return body


def _path(endpoint: str) -> str:
    return "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"


async def one_request(client, base_url: str, endpoint: str, model: str | None, prompt: str, max_tokens: int,
                      headers: dict[str, str], ignore_eos: bool = False) -> Record:
    """Send one streaming request and time it."""
    import httpx

    record = Record(ok=False)
    start = time.perf_counter()
    record.start = start
    last = None
    try:
        async with client.stream("POST", base_url + _path(endpoint),
                                 json=_body(endpoint, model, prompt, max_tokens, True, ignore_eos),
                                 headers=headers) as response:
            record.status = response.status_code
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                try:
                    text = json.loads(text)["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    pass
                record.error = text
                return record
            chars = 0
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("error"):
                    record.error = str(chunk["error"].get("message", chunk["error"]))
                    return record
                usage = chunk.get("usage")
                if usage:
                    record.prompt_tokens = usage.get("prompt_tokens")
                    record.output_tokens = usage.get("completion_tokens") or 0
                for choice in chunk.get("choices") or ():
                    piece = (choice.get("delta") or {}).get("content") if "delta" in choice else choice.get("text")
                    if piece:
                        now = time.perf_counter()
                        if last is None:
                            record.ttft_s = now - start
                        else:
                            record.itl_s.append(now - last)
                        last = now
                        record.chunks += 1
                        chars += len(piece)
                    if choice.get("finish_reason"):
                        record.finish_reason = choice["finish_reason"]
            if not record.output_tokens:  # no usage from the server: one token per chunk
                record.output_tokens = record.chunks
            record.ok = True
    except (httpx.HTTPError, OSError, ValueError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"
    finally:
        record.end = time.perf_counter()
        record.e2e_s = record.end - start
    return record


async def calibrate(client, base_url: str, endpoint: str, model: str | None, prompts: Prompts,
                    headers: dict[str, str]) -> float | None:
    """Size the prompts from the server's usage: prompt tokens are a + b * chars (the chat template and
    the question are the fixed part a), fitted on two calibration requests of 1 new token, then
    checked on a third. Returns the measured prompt tokens (None: no usage, ~4 chars/token kept)."""

    async def count(chars: int) -> int | None:
        body = _body(endpoint, model, prompts.get(0, chars), 1, False, False)
        response = await client.post(base_url + _path(endpoint), json=body, headers=headers)
        if response.status_code != 200:
            raise RuntimeError(f"calibration request failed with {response.status_code}: {response.text[:300]}")
        return (response.json().get("usage") or {}).get("prompt_tokens")

    small, large = max(1, prompts.tokens // 2), max(2, prompts.tokens)
    t_small, t_large = await count(small), await count(large)
    if not t_small or not t_large or t_large <= t_small:
        return None
    per_char = (t_large - t_small) / (large - small)
    fixed = t_small - per_char * small
    prompts.chars = max(1, round((prompts.tokens - fixed) / per_char))
    return await count(prompts.chars)


async def discover_model(client, base_url: str, headers: dict[str, str]) -> str | None:
    try:
        response = await client.get(base_url + "/v1/models", headers=headers)
        data = response.json().get("data") or []
        return data[0]["id"] if data else None
    except Exception:
        return None


async def run_level(base_url: str, endpoint: str, model: str | None, prompts: Prompts, concurrency: int,
                    requests: int, max_tokens: int, headers: dict[str, str], duration: float | None = None,
                    timeout: float = 600.0, progress: bool = True, first_index: int = 0,
                    ignore_eos: bool = False, server_pid: int | None = None,
                    ) -> tuple[list[Record], float, list[tuple[int, float, float]]]:
    """`concurrency` clients share `requests` requests (or run until `duration` s have passed).

    With `server_pid`, the server's RSS is sampled every `RSS_SAMPLE_S` seconds as requests end:
    `(requests done, seconds, MiB)` rows, the third return value."""
    import httpx
    from tqdm import tqdm

    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    records: list[Record] = []
    rss_samples: list[tuple[int, float, float]] = []
    counter = iter(range(first_index, first_index + (requests if duration is None else 10**9)))
    bar = tqdm(total=None if duration is not None else requests, desc=f"concurrency {concurrency}", unit="req",
               disable=not progress, file=sys.stderr, leave=False)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=30.0), limits=limits) as client:
        start = time.perf_counter()
        deadline = start + duration if duration is not None else None

        async def worker():
            for index in counter:
                if deadline is not None and time.perf_counter() >= deadline:
                    return
                record = await one_request(client, base_url, endpoint, model, prompts.get(index), max_tokens,
                                           headers, ignore_eos)
                records.append(record)
                elapsed = time.perf_counter() - start
                if server_pid is not None and (not rss_samples or elapsed - rss_samples[-1][1] >= RSS_SAMPLE_S):
                    rss = _server_rss(server_pid)
                    if rss is not None:
                        rss_samples.append((len(records), elapsed, rss))
                bar.update(1)
                if not record.ok:
                    bar.set_postfix(errors=sum(not r.ok for r in records))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    bar.close()
    return records, wall, rss_samples


def rss_drift(samples: list[tuple[int, float, float]], after: int = RSS_BASELINE_REQUESTS) -> float | None:
    """Last RSS sample over the first one taken once `after` requests had ended (the soak's drift:
    1.03 = grew 3% after warm-up); None without such samples."""
    settled = [rss for done, _, rss in samples if done >= after]
    return settled[-1] / settled[0] if len(settled) >= 2 else None


def _server_rss(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss / 2**20
    except Exception:
        return None


async def run_loadtest(url: str, concurrency: Sequence[int], prompt_tokens: int, max_tokens: int, requests: int,
                       *, model: str | None = None, api_key: str | None = None, endpoint: str = "chat",
                       duration: float | None = None, texts: str | None = None, timeout: float = 600.0,
                       progress: bool = True, label: str | None = None, server_pid: int | None = None,
                       ignore_eos: bool = False, warmup: int = 1) -> list[dict[str, Any]]:
    """Every concurrency level in turn; one summary row per level."""
    import httpx

    base_url = url.rstrip("/")
    if base_url.endswith("/v1"):
        base_url = base_url[:-3]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    prompts = Prompts(haystack_text(prompt_tokens * 4 * 16, texts), prompt_tokens)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=30.0)) as client:
        if model is None:
            model = await discover_model(client, base_url, headers)
        measured = await calibrate(client, base_url, endpoint, model, prompts, headers)
        for i in range(warmup):  # one streamed request, so first-call costs stay out of the numbers
            await one_request(client, base_url, endpoint, model, prompts.get(10**6 + i), min(max_tokens, 8),
                              headers, ignore_eos)
    if progress:
        how = f"{measured} tokens by the server's count" if measured else "~4 chars/token (no usage from the server)"
        print(f"loadtest {base_url} model={model} endpoint={endpoint}: prompts of {prompts.chars} chars "
              f"({how}), {max_tokens} new tokens", file=sys.stderr)
    rows = []
    first = 0
    for level in concurrency:
        rss_before = _server_rss(server_pid)
        records, wall, samples = await run_level(
            base_url, endpoint, model, prompts, level, requests, max_tokens, headers, duration=duration,
            timeout=timeout, progress=progress, first_index=first, ignore_eos=ignore_eos, server_pid=server_pid)
        first += len(records)
        row = summarize(records, level, wall, label)
        row.update(model=model, endpoint=endpoint, prompt_tokens_target=prompt_tokens, max_tokens=max_tokens)
        if server_pid is not None:
            row["server_rss_mib_before"] = rss_before
            row["server_rss_mib_after"] = _server_rss(server_pid)
            row["server_rss_samples"] = samples
            row["server_rss_drift"] = rss_drift(samples)
        rows.append(row)
        if progress:
            print(format_row(row), file=sys.stderr)
    return rows


# -- output -------------------------------------------------------------------------------------
COLUMNS = [("label", "server", "{}"), ("concurrency", "conc", "{}"), ("requests", "req", "{}"),
           ("errors", "err", "{}"), ("throughput_tok_s", "out tok/s", "{:.1f}"), ("request_per_s", "req/s", "{:.2f}"),
           ("ttft_p50_s", "TTFT p50", "{:.3f}"), ("ttft_p99_s", "TTFT p99", "{:.3f}"),
           ("itl_p50_s", "ITL p50", "{:.4f}"), ("itl_p99_s", "ITL p99", "{:.4f}"),
           ("e2e_p50_s", "E2E p50", "{:.2f}"), ("e2e_p99_s", "E2E p99", "{:.2f}"),
           ("mean_prompt_tokens", "prompt tok", "{:.0f}"), ("mean_output_tokens", "out tok", "{:.1f}"),
           ("server_rss_mib_after", "RSS MiB", "{:.0f}"), ("server_rss_drift", "RSS drift", "{:.3f}")]


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    return "-" if value is None else fmt.format(value)


def format_row(row: dict) -> str:
    return " | ".join(f"{title} {_cell(row, key, fmt)}" for key, title, fmt in COLUMNS if key in row)


def table(rows: list[dict]) -> str:
    """A markdown table (times in seconds)."""
    columns = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    lines = ["| " + " | ".join(title for _, title, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row, key, fmt) for key, _, fmt in columns) + " |")
    return "\n".join(lines)


def plot(path: str | Path, rows: list[dict], title: str) -> list[Path]:
    """The levels against concurrency; with a level's RSS samples (`--server-pid`, a soak), also the
    server's RSS against requests ended, in `<stem>_rss.png` beside it."""
    from .plot import line_plot

    rows = [{**r, "series": r.get("label") or r.get("model") or "server"} for r in rows]
    paths = [line_plot(path, [("throughput_tok_s", "aggregate output tok/s"), ("ttft_p99_s", "TTFT p99 (s)"),
                              ("itl_p50_s", "inter-token p50 (s)"), ("itl_p99_s", "inter-token p99 (s)")],
                       rows, "concurrency", "series", title)]
    samples = [{"series": f"{r['series']} c={r['concurrency']}", "requests ended": done, "rss": rss}
               for r in rows if len(r.get("server_rss_samples") or []) >= 3 for done, _, rss in r["server_rss_samples"]]
    if samples:
        path = Path(path)
        paths.append(line_plot(path.with_name(f"{path.stem}_rss.png"), [("rss", "server RSS (MiB)")], samples,
                               "requests ended", "series", title))
    return paths


def _ints(text: str) -> list[int]:
    values = [int(x) for x in text.split(",") if x.strip()]
    if not values or any(v < 1 for v in values):
        raise ValueError(f"--concurrency wants positive integers like 1,4,8,16, got {text!r}")
    return values


def add_loadtest_parser(sub):
    """The `kvtrt loadtest` subcommand."""
    p = sub.add_parser("loadtest", help="load-test any OpenAI-compatible server (throughput, TTFT, inter-token latency)",
                       description=__doc__.split("\n\n", 1)[1].strip(),
                       formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("url", help="server base URL, e.g. http://127.0.0.1:8000 (a trailing /v1 is accepted)")
    p.add_argument("--concurrency", type=_ints, default=[1, 4, 8, 16],
                   help="comma-separated numbers of concurrent clients, one level after the other (default 1,4,8,16)")
    p.add_argument("--prompt-tokens", type=int, default=2048,
                   help="approximate prompt length in tokens (sized with the server's usage count; default 2048)")
    p.add_argument("--max-tokens", type=int, default=128, help="max_tokens of every request (default 128)")
    p.add_argument("--requests", type=int, default=32, help="requests per concurrency level (default 32)")
    p.add_argument("--duration", type=float, default=None,
                   help="instead of --requests: keep each level running for this many seconds (soak)")
    p.add_argument("--endpoint", choices=["chat", "completions"], default="chat",
                   help="chat: /v1/chat/completions with the prompt as a user message (default; every peer has "
                        "it); completions: /v1/completions with the raw prompt")
    p.add_argument("--model", default=None, help="the `model` field (default: the first id of GET /v1/models)")
    p.add_argument("--api-key", default=None, help="sent as `Authorization: Bearer KEY`")
    p.add_argument("--label", default=None, help="series name in the table and plot (default: the model name)")
    p.add_argument("--texts", default=None, help="text file or folder for the prompts (default ../shared/data/haystack, "
                                                 "generated filler when absent)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before one request is abandoned (an error)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="send vLLM's ignore_eos extension so every request generates --max-tokens (servers "
                        "without it ignore the field or refuse the request)")
    p.add_argument("--server-pid", type=int, default=None,
                   help="a local server's process id: record its RSS before and after each level and every "
                        f"{RSS_SAMPLE_S:.0f} s during it (the soak's drift, from the sample after {RSS_BASELINE_REQUESTS} "
                        "requests; needs psutil)")
    p.add_argument("--compare", nargs="+", default=[], metavar="JSON",
                   help="earlier --json outputs to put in the same table and plot (e.g. a peer server's run)")
    p.add_argument("--json", help="write the rows (and --compare rows) as JSON here")
    p.add_argument("--plot", help="write a PNG here: throughput, TTFT p99, inter-token p50 and p99 against concurrency")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or per-level lines")
    p.set_defaults(func=cmd_loadtest)
    return p


def cmd_loadtest(args) -> int:
    try:
        import httpx  # noqa: F401
    except ImportError:
        raise RuntimeError("kvtrt loadtest needs httpx: pip install 'kvtrt[serve]'") from None
    if args.requests < 1 or args.max_tokens < 1 or args.prompt_tokens < 1:
        raise ValueError("--requests, --max-tokens and --prompt-tokens must be positive")
    if args.duration is not None and args.duration <= 0:
        raise ValueError("--duration must be positive seconds")
    rows = asyncio.run(run_loadtest(args.url, args.concurrency, args.prompt_tokens, args.max_tokens, args.requests,
                                    model=args.model, api_key=args.api_key,
                                    endpoint="chat" if args.endpoint == "chat" else "completions",
                                    duration=args.duration, texts=args.texts, timeout=args.timeout,
                                    progress=not args.quiet, label=args.label, server_pid=args.server_pid,
                                    ignore_eos=args.ignore_eos))
    for row in rows:
        row.setdefault("label", args.label or row.get("model") or "server")
    every = list(rows)
    for path in args.compare:
        every += json.loads(Path(path).read_text())
    print(table(every))
    if args.json:
        Path(args.json).write_text(json.dumps(every, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        title = f"kvtrt loadtest: {args.prompt_tokens}-token prompts, {args.max_tokens} new tokens"
        for path in plot(args.plot, every, title):
            print(f"wrote {path}", file=sys.stderr)
    return 1 if any(r["errors"] for r in rows) else 0


def records_as_dicts(records: list[Record]) -> list[dict]:
    return [asdict(r) for r in records]
