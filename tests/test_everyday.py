"""The everyday loop (`python -m pytest -q -m "not slow"`, README) still touches every module: each .py
at the top, in training/ and in scripts/ is imported or named by a test that the loop runs."""
import ast
import re

from conftest import ROOT


def is_slow(node):
    return any('slow' in ast.unparse(d) for d in node.decorator_list)


def everyday_text():
    """The source of the tests the loop runs: module level (imports, helpers, fixtures, tables) and
    every test function not marked slow, from every test file."""
    parts = []
    for path in sorted((ROOT / 'tests').glob('*.py')):
        source = path.read_text()
        for node in ast.parse(source).body:
            if not (isinstance(node, ast.FunctionDef) and node.name.startswith('test') and is_slow(node)):
                parts.append(ast.get_source_segment(source, node))
    return '\n'.join(parts)


def test_every_module_is_touched_by_a_test_the_everyday_loop_runs():
    text = everyday_text()
    modules = [p for p in [*ROOT.glob('*.py'), *(ROOT / 'training').glob('*.py'), *(ROOT / 'scripts').glob('*.py')]
               if p.name != '__init__.py']
    untouched = [str(p.relative_to(ROOT)) for p in modules
                 if not re.search(rf'\b(import|from) [\w., ]*\b{p.stem}\b|\b{p.stem}\.py\b', text)]
    assert untouched == []


def test_readme_names_the_everyday_loop_after_the_full_suite():
    text = (ROOT / 'README.md').read_text()
    assert text.index('python -m pytest -q\n') < text.index('python -m pytest -q -m "not slow"')


def test_the_layers_import_one_way():
    """The paper's math and the networks import nothing from the machinery (docs/code.md), which
    has at most ten modules; at most six files at the top."""
    for name in ('utils.py', 'resnet.py', 'cifar_nets.py'):
        imports = [n for n in ast.walk(ast.parse((ROOT / name).read_text())) if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = [getattr(n, 'module', None) or a.name for n in imports for a in n.names]
        assert not [m for m in names if m and m.split('.')[0] == 'training'], name
    assert len([p for p in (ROOT / 'training').glob('*.py') if p.name != '__init__.py']) <= 10
    assert len(list(ROOT.glob('*.py'))) <= 6
