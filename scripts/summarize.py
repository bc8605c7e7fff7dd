#!/usr/bin/env python
"""Rebuilds the paper's CIFAR-10 Table 1, or the CIFAR-100 table of RepDistiller, from run folders,
beside the published figures.

    python scripts/summarize.py logs/ [--out docs/results/table1] [--plots docs/results] [--epoch N]
                                      [--rows '16_1_16_2 nin']
    python scripts/summarize.py logs/cifar100 --table cifar100 --out docs/results/cifar100

Runs are found by the names scripts/table1.sh and scripts/cifar100.sh give them (resnet_16_2_teacher,
at_16_1_16_2, kd_resnet20_56_s1, ...). Each cell is reported twice, in separate columns, never mixed:
the last epoch's figure, beside the published one (RepDistiller's figures are last-epoch ones, as the
comment beside best_acc in its train_student.py and train_teacher.py says), and the best epoch's (what
its code prints as best accuracy), each as the median and the mean +- sample std over the seeds, with
the seed count. The CIFAR-100 table comes in two parts, as published: teacher and student of the same
network family, and of different families.
Table 1 is in test error %, the CIFAR-100 table in top-1 accuracy %. Only finished runs count; a cell
without one shows as missing. --epoch N reads every run at epoch N instead (runs that reached it; the
best epoch then among 1..N), to compare runs of different lengths at a common point. Gradient-based AT
runs (gradat_*, not in the paper's table) get rows of their own when present.
Writes TABLE.md, TABLE.csv and TABLE.json, and a learning-curve PNG per pair.
"""
import csv
import json
import os
import re
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from training.rundir import finished, read_json_stats  # noqa: E402
from training.errors import cli  # noqa: E402
from training.options import Parser  # noqa: E402
from training.errors import UserError  # noqa: E402

PROG = 'summarize.py'


class Table:
    """One published table: its methods, figures and run names. `metric` is 'error' (lower is
    better) or 'accuracy'; PAPER maps pair -> (student label, teacher label, figures by method)."""

    def __init__(self, name, metric, methods, headers, paper, student, teacher, rows, optional=(), parts=None,
                 note=''):
        self.name, self.metric, self.methods, self.headers = name, metric, methods, dict(zip(methods, headers))
        self.paper, self.student, self.teacher, self.rows, self.optional = paper, student, teacher, rows, set(optional)
        self.parts = parts or {'': list(paper)}  # title: its pairs, printed as tables of their own
        self.note = note  # what the published figures are

    def run_name(self, pair, method):
        if method == 'student':
            return self.student[pair]
        if method == 'teacher':
            return self.teacher[pair]
        return f'{method}_{pair}'

    def value(self, record):
        """A log record's figure: top-1 test error or accuracy, %."""
        acc = record['test_acc']
        acc = acc[0] if isinstance(acc, list) else acc
        return 100 - acc if self.metric == 'error' else acc

    def best(self, values):
        return min(values) if self.metric == 'error' else max(values)


# The paper's Table 1, test errors (%). One table, so that a correction is one edit.
# None: the paper gives no CIFAR figure for gradient-based AT with these pairs.
TABLE1_PAPER = {
    'nin_thin_nin_wide': ('NIN-thin, 0.2M', 'NIN-wide, 1M', [9.38, 8.93, 9.05, 8.55, 8.33, None, 7.28]),
    '16_1_16_2': ('WRN-16-1, 0.2M', 'WRN-16-2, 0.7M', [8.77, 7.93, 8.51, 7.41, 7.51, None, 6.31]),
    '16_1_40_1': ('WRN-16-1, 0.2M', 'WRN-40-1, 0.6M', [8.77, 8.25, 8.62, 8.39, 8.01, None, 6.58]),
    '16_2_40_2': ('WRN-16-2, 0.7M', 'WRN-40-2, 2.2M', [6.31, 5.85, 6.24, 6.08, 5.71, None, 5.23]),
}
TABLE1 = Table(
    'table1', 'error', ['student', 'at', 'factt', 'kd', 'atkd', 'gradat', 'teacher'],
    ['student', 'AT', 'F-ActT', 'KD', 'AT+KD', 'grad-AT', 'teacher'],
    {pair: (s, t, dict(zip(['student', 'at', 'factt', 'kd', 'atkd', 'gradat', 'teacher'], figures)))
     for pair, (s, t, figures) in TABLE1_PAPER.items()},
    student={'nin_thin_nin_wide': 'nin_thin', '16_1_16_2': 'resnet_16_1', '16_1_40_1': 'resnet_16_1',
             '16_2_40_2': 'resnet_16_2'},
    teacher={'nin_thin_nin_wide': 'nin_wide_teacher', '16_1_16_2': 'resnet_16_2_teacher',
             '16_1_40_1': 'resnet_40_1_teacher', '16_2_40_2': 'resnet_40_2_teacher'},
    rows={pair.split('_')[0] if pair.startswith('nin') else pair: pair for pair in TABLE1_PAPER},  # table1.sh's
    optional=['gradat'])  # columns the paper's Table 1 lacks: shown only where runs exist

# RepDistiller's CIFAR-100 tables (Tian et al., ICLR 2020, Tables 1 and 2), top-1 accuracy (%): teacher,
# student, AT, KD, from its README.md ("Benchmark Results on CIFAR-100"). They are last-epoch figures: "The
# results reported in the paper/README is from the last epoch", says the comment beside best_acc in its
# train_student.py and train_teacher.py. Pair names are cifar100.sh's: student, then teacher.
CIFAR100_SAME = {
    'wrn_16_2_40_2': ('WRN-16-2', 'WRN-40-2', [75.61, 73.26, 74.08, 74.92]),
    'wrn_40_1_40_2': ('WRN-40-1', 'WRN-40-2', [75.61, 71.98, 72.77, 73.54]),
    'resnet20_56': ('resnet20', 'resnet56', [72.34, 69.06, 70.55, 70.66]),
    'resnet20_110': ('resnet20', 'resnet110', [74.31, 69.06, 70.22, 70.67]),
    'resnet32_110': ('resnet32', 'resnet110', [74.31, 71.14, 72.31, 73.08]),
    'resnet8x4_32x4': ('resnet8x4', 'resnet32x4', [79.42, 72.50, 73.44, 73.33]),
    'vgg8_13': ('vgg8', 'vgg13', [74.64, 70.36, 71.43, 72.98]),
}
CIFAR100_CROSS = {
    'MobileNetV2_vgg13': ('MobileNetV2', 'vgg13', [74.64, 64.60, 59.40, 67.37]),
    'MobileNetV2_ResNet50': ('MobileNetV2', 'ResNet50', [79.34, 64.60, 58.58, 67.35]),
    'vgg8_ResNet50': ('vgg8', 'ResNet50', [79.34, 70.36, 71.84, 73.81]),
    'ShuffleV1_resnet32x4': ('ShuffleV1', 'resnet32x4', [79.42, 70.50, 71.73, 74.07]),
    'ShuffleV2_resnet32x4': ('ShuffleV2', 'resnet32x4', [79.42, 71.82, 72.73, 74.45]),
    'ShuffleV1_wrn_40_2': ('ShuffleV1', 'WRN-40-2', [75.61, 70.50, 73.32, 74.83]),
}
CIFAR100_PAPER = {**CIFAR100_SAME, **CIFAR100_CROSS}
CIFAR100_NETS = {'WRN-16-2': 'wrn_16_2', 'WRN-40-1': 'wrn_40_1', 'WRN-40-2': 'wrn_40_2'}  # cifar100.sh's run names
CIFAR100 = Table(
    'cifar100', 'accuracy', ['teacher', 'student', 'at', 'kd'], ['teacher', 'student', 'AT', 'KD'],
    {pair: (s, t, dict(zip(['teacher', 'student', 'at', 'kd'], figures))) for pair, (s, t, figures) in CIFAR100_PAPER.items()},
    student={pair: CIFAR100_NETS.get(s, s) for pair, (s, _, _) in CIFAR100_PAPER.items()},
    teacher={pair: CIFAR100_NETS.get(t, t) + '_teacher' for pair, (_, t, _) in CIFAR100_PAPER.items()},
    rows={pair: pair for pair in CIFAR100_PAPER},
    parts={'Teacher and student of the same family': list(CIFAR100_SAME),
           'Teacher and student of different families': list(CIFAR100_CROSS)},
    note='paper: RepDistiller\'s README/paper table, last-epoch figures (its train_student.py and train_teacher.py '
         'say so beside best_acc): compare them with the last columns. ')

TABLES = {'table1': TABLE1, 'cifar100': CIFAR100}


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
            done = finished(os.path.join(logs, name)) is not None  # the one definition of done
        if done:
            runs.setdefault(re.sub(r'_s\d+$', '', name), []).append(records)
    return runs


def summary(values):
    """{'median', 'mean', 'std'} over the seeds' figures (std: the sample's, None under 2 seeds)."""
    if not values:
        return {'median': None, 'mean': None, 'std': None}
    return {'median': statistics.median(values), 'mean': statistics.fmean(values),
            'std': statistics.stdev(values) if len(values) > 1 else None}


def table(runs, pairs=None, tab=TABLE1):
    rows = []
    for pair in pairs or list(tab.paper):
        student, teacher, paper = tab.paper[pair]
        for method in tab.methods:
            seeds = runs.get(tab.run_name(pair, method), [])
            last = [tab.value(r[-1]) for r in seeds]
            best = [tab.best([tab.value(x) for x in r]) for r in seeds]
            ls, bs, theirs = summary(last), summary(best), paper.get(method)
            rows.append(dict(pair=pair, student=student, teacher=teacher, method=method, metric=tab.metric,
                             seeds=len(seeds), paper=theirs, ours=ls['median'],
                             diff=None if ls['median'] is None or theirs is None else ls['median'] - theirs,
                             spread=[min(last), max(last)] if last else None,
                             last=ls, best=bs,
                             best_diff=None if bs['median'] is None or theirs is None else bs['median'] - theirs))
    return rows


def fmt(x):
    return '—' if x is None else f'{x:.2f}'


def mean_std(s):
    if s['mean'] is None:
        return '—'
    return f'{s["mean"]:.2f} ± ' + ('—' if s['std'] is None else f'{s["std"]:.2f}')


def markdown(rows, tab=TABLE1):
    """One line a (pair, method): the published figure, then the last epoch's and the best epoch's
    figures in columns of their own; a table for each part of the published table (tab.parts)."""
    what = 'test error %' if tab.metric == 'error' else 'top-1 accuracy %'
    header = ['| student | teacher | method | paper | last: median | last: mean ± std | best: median | '
              'best: mean ± std | seeds |', '|---|---|---|---|---|---|---|---|---|']
    parts = []
    for title, pairs in tab.parts.items():
        lines = []
        for r in rows:
            if r['pair'] not in pairs or r['method'] in tab.optional and not any(
                    q['method'] == r['method'] and q['seeds'] for q in rows):
                continue
            paper = 'n/a' if r['paper'] is None else f'{r["paper"]:.2f}'
            lines.append(f'| {r["student"]} | {r["teacher"]} | {tab.headers[r["method"]]} | {paper} | '
                         f'{fmt(r["last"]["median"])} | {mean_std(r["last"])} | {fmt(r["best"]["median"])} | '
                         f'{mean_std(r["best"])} | {r["seeds"]} |')
        if lines:
            parts.append((f'### {title}\n\n' if title else '') + '\n'.join(header + lines))
    return '\n\n'.join(parts) + (
        f'\n\nFigures: {what}. {tab.note}last: the final epoch of each run; best: the best epoch of each run; '
        'each as the median and the mean ± sample std over the seeds '
        '(std — under 2 seeds). — : no finished run; n/a: not in the published table.\n')


def plot(runs, out_dir, pairs, tab):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    written = []
    for pair in pairs:
        student, teacher, _ = tab.paper[pair]
        curves = [(m, runs[tab.run_name(pair, m)]) for m in tab.methods if tab.run_name(pair, m) in runs]
        if not curves:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
        for method, seeds in curves:
            for i, records in enumerate(seeds):
                ax.plot([r['epoch'] for r in records], [tab.value(r) for r in records],
                        color=f'C{tab.methods.index(method)}', alpha=0.8, marker='o', markersize=3,
                        label=tab.headers[method] if i == 0 else None)
        ax.set(xlabel='epoch', ylabel='test error %' if tab.metric == 'error' else 'top-1 accuracy %',
               title=f'{student} <- {teacher}')
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, f'curves_{pair}.png')
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def provenance(logs, pairs, tab):
    """A Markdown table of where each shown run came from: its run.json's first session, and its resumes."""
    from training import rundir as prov
    lines = ['| run | commit | torch | device | sessions |', '|---|---|---|---|---|']
    names = [tab.run_name(p, m) for p in pairs for m in ('teacher', *tab.methods)]
    for folder in sorted(f for f in os.listdir(logs) if re.sub(r'_s\d+$', '', f) in names):
        sessions = prov.read_sessions(os.path.join(logs, folder))
        if not sessions:
            lines.append(f'| {folder} | — | — | — | 0 |')
            continue
        s = sessions[0]
        commit = s['git']['commit'][:10] + (' (dirty)' if s['git']['dirty'] is True else '')
        devices = ', '.join(s['devices']) or f'{s["device"]} ({s["cpu"]["model"]})'
        lines.append(f'| {folder} | {commit} | {s["torch"]} | {devices} x {s["processes"]} | {len(sessions)} |')
    return '\n'.join(lines) + '\n'


def flat_csv_row(r):
    out = {k: v for k, v in r.items() if k not in ('last', 'best', 'spread')}
    out['spread'] = '' if r['spread'] is None else '%.2f-%.2f' % tuple(r['spread'])
    for which in ('last', 'best'):
        out.update({f'{which}_{k}': v for k, v in r[which].items()})
    return out


def main(argv=None):
    p = Parser(prog=PROG, description=__doc__.split('\n')[0])
    p.add_argument('logs', help='folder of run folders')
    p.add_argument('--table', default='table1', choices=list(TABLES),
                   help='table1: the paper\'s CIFAR-10 Table 1 (table1.sh); cifar100: RepDistiller\'s (cifar100.sh)')
    p.add_argument('--out', default=None, help='path prefix for .md, .csv and .json (default: the --table name)')
    p.add_argument('--plots', default=None, help='folder for learning-curve PNGs (default: beside --out)')
    p.add_argument('--epoch', type=int, default=None, help='read every run at this epoch, not at its end')
    p.add_argument('--rows', default=None, help='rows to show, as table1.sh or cifar100.sh names them (default: all)')
    p.add_argument('--provenance', action='store_true', help="also list each run's commit, torch and devices (run.json)")
    args = p.parse_args(argv)
    tab = TABLES[args.table]
    names = ' '.join(tab.rows) if args.rows is None else args.rows
    unknown = [r for r in names.split() if r not in tab.rows]
    if unknown:
        raise UserError(f'unknown row {unknown[0]!r} (rows: {" ".join(tab.rows)})')
    pairs = [tab.rows[r] for r in names.split()]
    if not pairs:
        raise UserError(f'--rows names no row (rows: {" ".join(tab.rows)})')
    if not os.path.isdir(args.logs):
        raise UserError(f'no such folder: {args.logs}')
    if args.epoch is not None and args.epoch < 1:
        raise UserError(f'--epoch must be 1 or more, got {args.epoch}')
    out = args.out or args.table
    runs = collect(args.logs, args.epoch)
    rows = table(runs, pairs, tab)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    except OSError as e:
        raise UserError(f'--out {out}: cannot make its folder: {e.strerror}') from None
    text = markdown(rows, tab) + ('\n' + provenance(args.logs, pairs, tab) if args.provenance else '')
    with open(out + '.md', 'w') as fh:
        fh.write(text)
    with open(out + '.json', 'w') as fh:
        json.dump(rows, fh, indent=1)
    with open(out + '.csv', 'w', newline='') as fh:
        flat = [flat_csv_row(r) for r in rows]
        w = csv.DictWriter(fh, fieldnames=list(flat[0]))
        w.writeheader()
        w.writerows(flat)
    plots = plot(runs, args.plots or os.path.dirname(os.path.abspath(out)), pairs, tab)
    print(text)
    print(f'wrote {out}.md, .csv, .json' + (f' and {len(plots)} plot(s)' if plots else ''))


if __name__ == '__main__':
    cli(main, PROG)
