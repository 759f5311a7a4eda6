"""Which precision settings a benchmark times (a helper of the scripts here, not a benchmark).

The rule is the product's: bf16 is timed only where `precision=auto` would pick it
(`scratchllm.common.select_precision("auto", device)`: CUDA GPUs with bf16, CPUs with AMX or
AVX512-BF16), or when the user asks for it by name. On a CPU without native bf16 (an AVX2-only AMD
EPYC, say) bf16 matmuls are emulated, about 100x slower than fp32: timing them measures the
emulation, not our code, and turns a smoke run of a few seconds into hours.

    run, skipped = choose_settings(["fp32", "bf16", "bf16+compile"], "cpu", explicit=False)
    print_skipped(skipped, "--precision bf16")   # "skipped bf16: ... ; pass --precision bf16 to time it"
"""

from __future__ import annotations

from scratchllm.common import select_precision


def bf16_reason(device: str) -> str | None:
    """None when precision=auto picks bf16 on `device`; else why it does not (one clause)."""
    if select_precision("auto", device) == "bf16":
        return None
    if device == "cpu":
        return ("precision=auto picks fp32 on this CPU: no native bf16 (no AMX or AVX512-BF16 in "
                "/proc/cpuinfo), so bf16 matmuls would be emulated, about 100x slower")
    if device.startswith("cuda"):
        return "precision=auto picks fp32 on this GPU: torch reports no bf16 support"
    return f"precision=auto picks fp32 on {device}"


def choose_settings(settings: list[str], device: str, explicit: bool) -> tuple[list[str], dict[str, str]]:
    """Split settings named "PRECISION[+extra]" ("fp32", "bf16", "bf16+compile") into (those to run,
    {skipped setting: reason}). Settings the user asked for (`explicit`) all run; by default a bf16
    setting runs only where `bf16_reason(device)` is None."""
    why = None if explicit else bf16_reason(device)
    run = [s for s in settings if why is None or s.split("+")[0] != "bf16"]
    return run, {s: why for s in settings if s not in run}


def print_skipped(skipped: dict[str, str], flag: str) -> None:
    """One line per skipped setting, saying why and which flag times it anyway (`flag` may name the
    setting as {setting}: "--settings {setting}")."""
    for setting, why in skipped.items():
        print(f"skipped {setting}: {why}; pass {flag.format(setting=setting)} to time it anyway", flush=True)
