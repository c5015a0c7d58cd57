"""``llnode status``: a running cluster's membership, leader and term, as a table or one JSON object."""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--node", default="http://127.0.0.1:7700", help="HTTP URL of any node of the cluster")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--api-token",
        default=os.environ.get("LLNODE_API_TOKEN", ""),
        help="bearer token if the node requires one [env LLNODE_API_TOKEN]",
    )
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the node")


def fetch_status(url: str, token: str = "", timeout: float = 5.0) -> dict[str, Any]:
    """GET <url>/api/status; raises ``RuntimeError`` with a readable reason."""
    req = urllib.request.Request(url.rstrip("/") + "/api/status")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            doc = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise RuntimeError(
            f"{url} answered HTTP {exc.code}" + (" (need --api-token)" if exc.code == 401 else "")
        ) from None
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise RuntimeError(f"cannot reach {url}: {getattr(exc, 'reason', exc)}") from None
    except ValueError:
        raise RuntimeError(f"{url} did not answer JSON: is it an llnode node?") from None
    if not isinstance(doc, dict) or "members" not in doc:
        raise RuntimeError(f"{url} did not answer an llnode status")
    return doc


def format_table(doc: dict[str, Any]) -> str:
    rows = [("ID", "NAME", "STATUS", "ROLE", "TERM", "ADDRESS", "CORES", "MEM FREE", "BATTERY")]
    for m in doc["members"]:
        mem = (m.get("memory") or {}).get("free")
        bat = m.get("battery") or None
        rows.append(
            (
                m["id"] + (" *" if m.get("self") else ""),
                str(m.get("name", "")),
                str(m.get("status", "alive" if m.get("alive") else "dead")),
                str(m.get("role", "")),
                str(m.get("term", "")),
                f"{m.get('host', '?')}:{m.get('peer_port', '?')}",
                _cores(m),
                f"{mem / 2**30:.1f} GiB" if isinstance(mem, int) else "",
                (f"{bat['level']}%" + ("+" if bat.get("charging") else "")) if isinstance(bat, dict) else "",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    head = f"cluster {doc.get('cluster_id', '?')}  leader {doc.get('leader')}  term {doc.get('term')}"
    return head + "\n" + "\n".join(lines) + format_pipeline(doc)


def _cores(member: dict[str, Any]) -> str:
    """``2``, or ``2 (0.30)`` when a CPU quota gives the node less than its cores."""
    cores, limit = member.get("cores"), member.get("cpu_limit")
    if isinstance(limit, (int, float)) and isinstance(cores, int) and limit < cores:
        return f"{cores} ({limit:.2f})"
    return str(cores if cores is not None else "")


def format_pipeline(doc: dict[str, Any]) -> str:
    """The plan in force and each stage's predicted vs measured ms/token, plus recent events."""
    pipe = doc.get("pipeline")
    if not isinstance(pipe, dict):
        return ""
    problem = f" ({pipe['problem']})" if pipe.get("problem") else ""
    out = [f"\nmodel {pipe.get('model')}: {pipe.get('state')}{problem}"]
    entry = pipe.get("plan") or {}
    if entry.get("error"):
        out.append(f"no plan: {entry['error']}")
    plan = entry.get("plan")
    if isinstance(plan, dict):
        out.append(
            f"plan epoch {plan.get('epoch')} ({plan.get('objective')}, {plan.get('solver')}): "
            f"predicted {1.0 / plan['bottleneck_s'] if plan.get('bottleneck_s') else 0:.1f} tokens/s"
        )
        measured = {m["id"]: (m.get("metrics") or {}).get("decode_ms") for m in doc.get("members", [])}
        for k, st in enumerate(plan.get("stages", [])):
            ms = measured.get(st["device_id"])
            out.append(
                f"  stage {k}: {st.get('name') or st['device_id']:<12} "
                f"modules [{st['start']:>2}, {st['end']:>2})  "
                f"predicted {1000 * st['compute_s']:.1f} ms/token"
                + (f", measured {ms:.1f}" if isinstance(ms, int | float) else "")
            )
        for device, why in (plan.get("left_out") or {}).items():
            out.append(f"  left out {device}: {why}")
    for ev in (pipe.get("events") or [])[-5:]:
        out.append(f"  event {ev.get('kind')}: {ev.get('message')}")
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    try:
        doc = fetch_status(args.node, args.api_token, args.timeout)
    except RuntimeError as exc:
        print(f"llnode status: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(doc, default=str))
    else:
        print(format_table(doc))
    return 0
