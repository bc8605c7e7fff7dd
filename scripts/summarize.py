#!/usr/bin/env python
"""Rebuilds the paper's CIFAR-10 Table 1 from run folders, beside the paper's figures.

    python scripts/summarize.py logs/ [--out docs/results/table1] [--plots docs/results] [--epoch N]
                                      [--rows '16_1_16_2 nin']

Runs are found by the names scripts/table1.sh gives them (resnet_16_2_teacher, at_16_1_16_2,
kd_16_1_16_2_s1, ...): a cell is the median final test error over its seeds, with the number of
seeds. Only finished runs count; a cell without one shows as missing. --epoch N reads every run
at epoch N instead (runs that reached it), to compare runs of different lengths at a common point.
Gradient-based AT runs (gradat_*, not in the paper's table) get a column of their own when present.
Writes TABLE.md, TABLE.csv and TABLE.json, and a learning-curve PNG per pair.
"""
import csv
import json
import os
import re
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from runs import Parser, cli, read_json_stats  # noqa: E402
from utils import UserError  # noqa: E402

PROG = 'summarize.py'
COLUMNS = ['student', 'at', 'factt', 'kd', 'atkd', 'gradat', 'teacher']
HEADERS = ['student', 'AT', 'F-ActT', 'KD', 'AT+KD', 'grad-AT', 'teacher']
OPTIONAL = {'gradat'}  # columns the paper's Table 1 lacks: shown only where runs exist
# The paper's Table 1, test errors (%). One table, so that a correction is one edit.
# None: the paper gives no CIFAR figure for gradient-based AT with these pairs.
PAPER = {
    'nin_thin_nin_wide': ('NIN-thin, 0.2M', 'NIN-wide, 1M', [9.38, 8.93, 9.05, 8.55, 8.33, None, 7.28]),
    '16_1_16_2': ('WRN-16-1, 0.2M', 'WRN-16-2, 0.7M', [8.77, 7.93, 8.51, 7.41, 7.51, None, 6.31]),
    '16_1_40_1': ('WRN-16-1, 0.2M', 'WRN-40-1, 0.6M', [8.77, 8.25, 8.62, 8.39, 8.01, None, 6.58]),
    '16_2_40_2': ('WRN-16-2, 0.7M', 'WRN-40-2, 2.2M', [6.31, 5.85, 6.24, 6.08, 5.71, None, 5.23]),
}
STUDENT = {'nin_thin_nin_wide': 'nin_thin', '16_1_16_2': 'resnet_16_1', '16_1_40_1': 'resnet_16_1',
           '16_2_40_2': 'resnet_16_2'}
TEACHER = {'nin_thin_nin_wide': 'nin_wide_teacher', '16_1_16_2': 'resnet_16_2_teacher',
           '16_1_40_1': 'resnet_40_1_teacher', '16_2_40_2': 'resnet_40_2_teacher'}


ROWS = {pair.split('_')[0] if pair.startswith('nin') else pair: pair for pair in PAPER}  # table1.sh's row names


def run_name(pair, column):
    if column == 'student':
        return STUDENT[pair]
    if column == 'teacher':
        return TEACHER[pair]
    return f'{column}_{pair}'


def collect(logs, epoch=None):
    """{base run name: [log records of each seed]} from a logs folder: finished runs, or with
    `epoch` the runs that reached it, cut there."""
    runs = {}
    for name in sorted(os.listdir(logs)):
        log = os.path.join(logs, name, 'log.txt')
        if not os.path.isfile(log):
            continue
        records = read_json_stats(log)
        if epoch is not None:
            records = [r for r in records if r.get('epoch', 0) <= epoch]
            done = bool(records) and records[-1].get('epoch') == epoch
        else:
            done = bool(records) and records[-1].get('epoch') == records[-1].get('epochs')
        if done:
            runs.setdefault(re.sub(r'_s\d+$', '', name), []).append(records)
    return runs


def error(records):
    acc = records[-1]['test_acc']
    return 100 - (acc[0] if isinstance(acc, list) else acc)


def table(runs, pairs=tuple(PAPER)):
    rows = []
    for pair in pairs:
        student, teacher, paper = PAPER[pair]
        for column, theirs in zip(COLUMNS, paper):
            seeds = runs.get(run_name(pair, column), [])
            errors = [error(r) for r in seeds]
            ours = statistics.median(errors) if errors else None
            rows.append(dict(pair=pair, student=student, teacher=teacher, method=column, ours=ours,
                             seeds=len(errors), spread=[min(errors), max(errors)] if errors else None,
                             paper=theirs, diff=None if ours is None or theirs is None else ours - theirs))
    return rows


def cell(r):
    paper = 'n/a' if r['paper'] is None else f'{r["paper"]:.2f}'
    if r['ours'] is None:
        return f'— ({paper})'
    diff = '' if r['diff'] is None else f', {r["diff"]:+.2f}'
    spread = f' [{r["spread"][0]:.2f}–{r["spread"][1]:.2f}]' if r['seeds'] > 1 else ''
    return f'{r["ours"]:.2f} ({paper}{diff}) n={r["seeds"]}{spread}'


def markdown(rows):
    shown = [(c, h) for c, h in zip(COLUMNS, HEADERS)
             if c not in OPTIONAL or any(r['method'] == c and r['seeds'] for r in rows)]
    lines = ['| student | teacher | ' + ' | '.join(h for _, h in shown) + ' |', '|---|---|' + '---|' * len(shown)]
    for pair in dict.fromkeys(r['pair'] for r in rows):
        student, teacher, _ = PAPER[pair]
        cells = [cell(next(r for r in rows if r['pair'] == pair and r['method'] == c)) for c, _ in shown]
        lines.append(f'| {student} | {teacher} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + ('\n\nEach cell: our median test error % (the paper\'s, our difference), '
                               'the number of seeds and [lowest–highest]; — : no finished run; n/a: not in the paper.\n')


def plot(runs, out_dir, pairs=tuple(PAPER)):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    written = []
    for pair in pairs:
        student, teacher, _ = PAPER[pair]
        curves = [(h, runs[run_name(pair, c)]) for c, h in zip(COLUMNS, HEADERS) if run_name(pair, c) in runs]
        if not curves:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
        for label, seeds in curves:
            for i, records in enumerate(seeds):
                ax.plot([r['epoch'] for r in records], [error([r]) for r in records],
                        color=f'C{HEADERS.index(label)}', alpha=0.8, marker='o', markersize=3, label=label if i == 0 else None)
        ax.set(xlabel='epoch', ylabel='test error %', title=f'{student} <- {teacher}')
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, f'curves_{pair}.png')
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def provenance(logs, pairs):
    """A Markdown table of where each shown run came from: its run.json's first session, and its resumes."""
    import provenance as prov
    lines = ['| run | commit | torch | device | sessions |', '|---|---|---|---|---|']
    names = [run_name(p, c) for p in pairs for c in COLUMNS]
    for folder in sorted(f for f in os.listdir(logs) if re.sub(r'_s\d+$', '', f) in names):
        sessions = prov.read(os.path.join(logs, folder))
        if not sessions:
            lines.append(f'| {folder} | — | — | — | 0 |')
            continue
        s = sessions[0]
        commit = s['git']['commit'][:10] + (' (dirty)' if s['git']['dirty'] is True else '')
        devices = ', '.join(s['devices']) or f'{s["device"]} ({s["cpu"]["model"]})'
        lines.append(f'| {folder} | {commit} | {s["torch"]} | {devices} x {s["processes"]} | {len(sessions)} |')
    return '\n'.join(lines) + '\n'


def main(argv=None):
    p = Parser(prog=PROG, description=__doc__.split('\n')[0])
    p.add_argument('logs', help='folder of run folders')
    p.add_argument('--out', default='table1', help='path prefix for .md, .csv and .json')
    p.add_argument('--plots', default=None, help='folder for learning-curve PNGs (default: beside --out)')
    p.add_argument('--epoch', type=int, default=None, help='read every run at this epoch, not at its end')
    p.add_argument('--rows', default=' '.join(ROWS), help='rows to show, as table1.sh names them (default: all)')
    p.add_argument('--provenance', action='store_true', help="also list each run's commit, torch and devices (run.json)")
    args = p.parse_args(argv)
    unknown = [r for r in args.rows.split() if r not in ROWS]
    if unknown:
        raise UserError(f'unknown row {unknown[0]!r} (rows: {" ".join(ROWS)})')
    pairs = [ROWS[r] for r in args.rows.split()]
    if not pairs:
        raise UserError(f'--rows names no row (rows: {" ".join(ROWS)})')
    if not os.path.isdir(args.logs):
        raise UserError(f'no such folder: {args.logs}')
    if args.epoch is not None and args.epoch < 1:
        raise UserError(f'--epoch must be 1 or more, got {args.epoch}')
    runs = collect(args.logs, args.epoch)
    rows = table(runs, pairs)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    except OSError as e:
        raise UserError(f'--out {args.out}: cannot make its folder: {e.strerror}') from None
    text = markdown(rows) + ('\n' + provenance(args.logs, pairs) if args.provenance else '')
    with open(args.out + '.md', 'w') as fh:
        fh.write(text)
    with open(args.out + '.json', 'w') as fh:
        json.dump(rows, fh, indent=1)
    with open(args.out + '.csv', 'w', newline='') as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({**r, 'spread': '' if r['spread'] is None else '%.2f-%.2f' % tuple(r['spread'])} for r in rows)
    plots = plot(runs, args.plots or os.path.dirname(os.path.abspath(args.out)), pairs)
    print(text)
    print(f'wrote {args.out}.md, .csv, .json' + (f' and {len(plots)} plot(s)' if plots else ''))


if __name__ == '__main__':
    cli(main, PROG)
