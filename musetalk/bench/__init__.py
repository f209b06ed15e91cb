"""The benchmarks, run as `python -m musetalk.bench` (see `__main__` for the flags).

* `speed`: the generation benchmark: our generator against the official loop, per stage, in
  GFLOP/s and as a share of the machine's peak (`--approx` adds the approximate decode).
* `official`: the reference, MuseTalk's real-time loop written out (frames byte-identical to ours).
* `timing`: stage timers, wall/CPU timing, the peak matmul rate, FLOP counts, frame comparison.
* `report`: the generation benchmark's text report.
* `streams`: `--streams N`: paced live sessions against the generation service, in process
  and (`--backend ray`) on the Ray Serve deployment.
* `device_report`: `report`: every figure of a device in one budgeted run, written to
  `report.json` and `report.md`. Its sections: `generation`, `stages`, `mouth` (with `speaker`,
  a TTS-fed live session), `memory`, `sessions`, `speedups`; `context` (settings, plan, models),
  `budget` (the time shares), `machine` (device and memory readings), `markdown` (report.md).

Random weights and synthetic avatars come from `musetalk.testing`; nothing outside this
package imports it.
"""
