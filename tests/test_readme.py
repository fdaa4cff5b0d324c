"""README.md and docs/results.md as a CommonMark renderer reads them (markdown-it-py, CommonMark's reference
rules, with GitHub's tables): every line that looks like a heading is one, every code fence closes on a line
of its own, every table renders with all its rows and columns, every relative link leads to a file (and
heading) that exists, and every shell block parses. One stray character after a closing fence turns the
rest of the page inside out: code becomes prose and prose code."""
import os
import re
import subprocess

import pytest
from markdown_it import MarkdownIt

ROOT = os.path.join(os.path.dirname(__file__), '..')
PAGES = ['README.md', 'docs/results.md']


def parse(page):
    text = open(os.path.join(ROOT, page), encoding='utf-8').read()
    return text, text.splitlines(), MarkdownIt('commonmark').enable('table').parse(text)


def slug(heading):
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')


def anchors(page):
    tokens = parse(page)[2]
    return {slug(tokens[i + 1].content) for i, t in enumerate(tokens) if t.type == 'heading_open'}


@pytest.mark.parametrize('page', PAGES)
def test_every_heading_is_a_heading_and_every_fence_closes(page):
    text, lines, tokens = parse(page)
    fences = [t for t in tokens if t.type == 'fence']
    assert len(fences) >= 3
    for fence in fences:  # a fence that never closes runs on, through the prose, to the next bare fence
        assert fence.map[1] <= len(lines) and lines[fence.map[1] - 1].strip() == fence.markup, \
            f'{page}: the fence opened on line {fence.map[0] + 1} does not close on a line of its own'
        inside = [fence.map[0] + 2 + i for i, line in enumerate(fence.content.splitlines())
                  if line.startswith(fence.markup[:3])]
        assert inside == [], f'{page}: a fence that does not close (characters after it) on lines {inside}'
    headings = {t.map[0] for t in tokens if t.type == 'heading_open'}
    in_code = {i for f in fences for i in range(*f.map)}
    looks_like = [i for i, line in enumerate(lines) if re.match(r'#{1,6} ', line) and i not in in_code]
    assert looks_like and [i + 1 for i in looks_like if i not in headings] == []


@pytest.mark.parametrize('page', PAGES)
def test_every_table_renders_whole(page):
    """A row with a missing or extra cell, or a table broken by a stray line, renders as prose or loses cells."""
    text, lines, tokens = parse(page)
    in_table = set()
    for i, t in enumerate(tokens):
        if t.type == 'table_open':
            in_table.update(range(*t.map))
            header = lines[t.map[0]]
            for row in range(t.map[0], t.map[1]):
                cells = re.split(r'(?<!\\)\|', lines[row].strip().strip('|'))
                assert len(cells) == len(re.split(r'(?<!\\)\|', header.strip().strip('|'))), \
                    f'{page}:{row + 1}: {len(cells)} cells, the header has another number'
    fences = {i for t in tokens if t.type in ('fence', 'code_block') for i in range(*t.map)}
    stray = [i + 1 for i, line in enumerate(lines) if line.startswith('|') and i not in in_table | fences]
    assert stray == [], f'{page}: table rows outside a table on lines {stray}'


@pytest.mark.parametrize('page', PAGES)
def test_every_relative_link_resolves(page):
    tokens = parse(page)[2]
    links = [child.attrs['href'] for t in tokens if t.type == 'inline' for child in t.children or []
             if child.type == 'link_open']
    for href in links:
        if re.match(r'[a-z]+:', href):  # https:, mailto:
            continue
        path, _, anchor = href.partition('#')
        target = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        assert os.path.exists(os.path.join(ROOT, target)), f'{page}: {href} leads to no file'
        if anchor:
            assert anchor in anchors(target), f'{page}: {href}: {target} has no heading #{anchor}'


@pytest.mark.parametrize('page', PAGES)
def test_every_shell_block_parses(page):
    """Every fence says what it holds; each bash one is valid shell (bash -n), as a user pastes it."""
    tokens = parse(page)[2]
    fences = [t for t in tokens if t.type == 'fence']
    assert [t.map[0] + 1 for t in fences if t.info.strip() not in ('bash', 'text')] == [], \
        f'{page}: fences without bash or text after the opening ```'
    for fence in fences:
        if fence.info.strip() == 'bash':
            check = subprocess.run(['bash', '-n'], input=fence.content, capture_output=True, text=True)
            assert check.returncode == 0, f'{page}:{fence.map[0] + 1}: {check.stderr.strip()}'
