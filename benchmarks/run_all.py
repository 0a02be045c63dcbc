"""Run the benchmark suite and rewrite benchmarks/RESULTS.md with what it printed.

Each script runs in its own process (so its peak memory is its own), one after another (timings
on a shared machine mean nothing). On a GPU the extraction benchmarks run at 512² in bfloat16
and float32; on a CPU with `random-sd15` at small sizes.

    python benchmarks/run_all.py                    # the full suite; rewrites RESULTS.md
    python benchmarks/run_all.py --quick --output /tmp/results.md   # tiny model, one repetition
    python benchmarks/run_all.py --only acceleration.py             # rerun one script, keep the other sections
"""

from __future__ import annotations

import argparse
import datetime
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def suite(gpu: bool, quick: bool) -> list[tuple[str, str, list[str]]]:
    """(title, script, arguments) of each run."""
    if quick:
        tiny = ["--model", "tiny", "--img_size", "64", "--repeats", "1"]
        return [
            ("Extraction cost (a, b)", "extraction_cost.py", tiny),
            ("Training step (c, e)", "training_step.py", ["--model", "tiny", "--img_size", "64", "--repeats", "1"]),
            ("UNet early stop", "unet_early_stop.py", tiny),
            ("Feature cache cold vs warm (d)", "feature_cache.py", ["--num_val", "2"]),
            (
                "Label-scarce memory",
                "scarce_memory.py",
                ["--model", "tiny", "--img_size", "64", "--steps", "2", "--test_images", "1"],
            ),
            (
                "channels_last and compile",
                "acceleration.py",
                tiny + ["--backend", "eager", "--settings", "plain", "compile+channels_last"],
            ),
            ("SPair evaluation memory (e)", "spair_memory.py", ["--model", "tiny", "--img_size", "64", "--pairs", "1"]),
            (
                "Merged weights per variant",
                "variant_weights_memory.py",
                ["--model", "tiny", "--dtype", "float32", "--text_encoder"],
            ),
            ("CLI start-up", "cli_startup.py", ["--repeats", "1", "--only", "csdiff --help", "layers --help"]),
        ]
    sizes = (
        [["--img_size", "512", "--dtype", "bfloat16"], ["--img_size", "512", "--dtype", "float32"]]
        if gpu
        else [["--img_size", "256"]]
    )
    runs = [(f"Extraction cost (a, b), {' '.join(s)}", "extraction_cost.py", s) for s in sizes]
    runs += [
        (
            "Training step (c, e)",
            "training_step.py",
            ["--img_size", "512" if gpu else "256"] + (["--dtype", "bfloat16"] if gpu else []),
        ),
        ("UNet early stop", "unet_early_stop.py", ["--model", "random-sd15", "--img_size", "512", "--repeats", "2"]),
        ("Feature cache cold vs warm (d), quickstart", "feature_cache.py", []),
        (
            "Feature cache cold vs warm (d), SD 1.5 size",
            "feature_cache.py",
            ["--model", "random-sd15", "--num_val", "16"],
        ),
        ("Label-scarce memory", "scarce_memory.py", ["--steps", "200", "--test_images", "4"]),
        (
            "channels_last and compile",
            "acceleration.py",
            ["--img_size", "512" if gpu else "256", "--repeats", "2"] + (["--dtype", "bfloat16"] if gpu else []),
        ),
        (
            "SPair evaluation memory (e)",
            "spair_memory.py",
            ["--dtype", "bfloat16", "--pairs", "3"] if gpu else ["--pairs", "1"],
        ),
        ("Start-up of the paper configs", "startup.py", []),
        (
            "Merged weights per variant",
            "variant_weights_memory.py",
            ["--dtype", "bfloat16" if gpu else "float16", "--text_encoder"],
        ),
        ("CLI start-up", "cli_startup.py", []),
    ]
    return runs


def sections(text: str) -> dict[str, str]:
    """A results file's sections by title ("" holds the header's paragraph)."""
    head, *parts = text.split("\n## ")
    out = {"": head.split("\n", 1)[1] if "\n" in head else ""}
    for part in parts:
        title, _, body = part.partition("\n")
        out[title] = body
    return out


def machine() -> str:
    if torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name(0)}"
    name = platform.processor() or "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            name = line.split(":", 1)[1].strip()
            break
    return f"CPU {name}, {torch.get_num_threads()} threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, one repetition (checks the scripts)")
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument(
        "--only", nargs="+", metavar="SCRIPT", help="run these scripts; keep the other sections of --output"
    )
    args = parser.parse_args()
    import diffusers

    from csdiff.io import save_text

    gpu = torch.cuda.is_available()
    previous = args.output.read_text() if args.output.is_file() else ""
    kept = sections(previous)
    header = (
        f"Written by `python benchmarks/run_all.py{' --quick' if args.quick else ''}` on {datetime.date.today()}: {machine()}; "
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, Python {platform.python_version()}. "
        "Each section gives the command and what it printed; ratios come from one run of that command. "
        "What each script measures is in its docstring."
    )
    if args.only and kept.get(""):  # the first run's header, with the scripts rerun since then
        first, _, rerun = kept[""].strip().partition(" Rerun with `--only`")
        earlier = re.findall(r"(\S+\.py)", rerun.split(" on ")[0]) if rerun else []
        scripts = ", ".join(dict.fromkeys(earlier + args.only))
        header = f"{first} Rerun with `--only` {scripts} on {datetime.date.today()}: {machine()}."
    lines = ["# Benchmark results", "", header]
    runs = suite(gpu, args.quick)
    unknown = sorted(set(args.only or []) - {script for _, script, _ in runs})
    if unknown:
        parser.error(f"--only: {unknown} not in the suite ({sorted({script for _, script, _ in runs})})")
    for title, script, extra in runs:
        if args.only and script not in args.only:
            if title in kept:
                lines += ["", f"## {title}", kept[title].rstrip()]
            continue
        command = [sys.executable, str(HERE / script), *extra]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        took = time.perf_counter() - start
        output = (
            done.stdout.strip()
            if done.returncode == 0
            else f"FAILED (exit {done.returncode}):\n{done.stderr.strip()[-2000:]}"
        )
        print(f"{title}: {took:.0f} s{'' if done.returncode == 0 else ' FAILED'}", flush=True)
        lines += ["", f"## {title}", "", f"`python benchmarks/{script} {' '.join(extra)}` ({took:.0f} s)", ""]
        if done.returncode == 0 and any(line.startswith("|") for line in output.splitlines()):
            # markdown tables go in as they are; a script's "# setup" line becomes an italic line
            lines += [f"*{line[2:]}*" if line.startswith("# ") else line for line in output.splitlines()]
        else:
            lines += ["```", output, "```"]
    if "\n## Notes" in previous:  # hand-written remarks on the figures are kept
        lines += ["", "## Notes" + previous.split("\n## Notes", 1)[1].rstrip()]
    save_text(args.output, "\n".join(lines) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
