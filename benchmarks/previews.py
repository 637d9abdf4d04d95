"""What the server's live previews cost: the same generation job with and without them, side by side.

The server decodes a batch's partial token grid into previews every few token rows (at most every
`grid // 8` rows and 0.2 s, `duomodal.serve.generator._Previews`) and checks for cancelling at
every row. This times `DalleGenerator.generate` on a DALL-E run with previews on and off, in
alternation, and prints the seconds of each, the ratio, and how many previews were decoded.

    nice -n 19 flock /tmp/duomodal-heavy.lock python benchmarks/previews.py --dalle work/demo/runs/dalle --threads 1 --repeats 5
"""

from __future__ import annotations

import argparse
import threading
import time

import torch

from duomodal.models.dalle import load_dalle
from duomodal.serve import generator as generator_module
from duomodal.serve.generator import DalleGenerator
from duomodal.serve.jobs import Job, JobControl
from this_machine import auto_precision, print_header


def run_job(generator: DalleGenerator, prompt: str, num: int, seed: int) -> tuple[float, int]:
    job = Job(id="bench", kind="generate", prompt=prompt)
    control = JobControl(job, threading.Event())
    started = time.perf_counter()
    generator.generate(prompt, num=num, keep=num, guidance=3.0, temperature=1.0, top_k=64, seed=seed,
                       control=control)
    return time.perf_counter() - started, 0 if job.preview is None else job.preview.version


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dalle", required=True, help="DALL-E run directory")
    parser.add_argument("--prompt", default="a red heart icon")
    parser.add_argument("--num", type=int, default=16, help="images per job (one batch)")
    parser.add_argument("--repeats", type=int, default=3, help="timed jobs per setting (the best is kept)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print_header(f"{auto_precision(args.device)} for sampling", args.device)
    run = load_dalle(args.dalle, device=args.device)
    generator = DalleGenerator(run, scorer=None, max_num=args.num, batch_size=args.num)
    with_previews = generator_module._Previews

    class NoPreviews(with_previews):
        def __call__(self, tokens, first, rows):  # only the cancel check, as if nobody watched
            self.control.check()

    run_job(generator, args.prompt, args.num, seed=0)  # warm up
    timings: dict[str, list[float]] = {"off": [], "on": []}
    previews = 0
    for repeat in range(args.repeats):
        for setting in ("off", "on"):
            generator_module._Previews = NoPreviews if setting == "off" else with_previews
            seconds, count = run_job(generator, args.prompt, args.num, seed=repeat)
            timings[setting].append(seconds)
            previews = count if setting == "on" else previews
    generator_module._Previews = with_previews
    off, on = min(timings["off"]), min(timings["on"])
    config = run.config
    print(f"DALL-E {args.dalle}: {config.image_size} px, {config.image_grid_size}x{config.image_grid_size} tokens; "
          f"{args.num} images in one batch, {torch.get_num_threads()} threads, {args.device}")
    print(f"previews off: {off:.3f} s   previews on: {on:.3f} s ({previews} previews decoded)   "
          f"ratio on/off: {on / off:.3f}")


if __name__ == "__main__":
    main()
