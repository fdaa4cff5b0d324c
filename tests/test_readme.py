"""README.md as a CommonMark renderer reads it (markdown-it-py, CommonMark's reference rules): every line that
looks like a heading is one, and every code fence closes on a line of its own. One stray character after a
closing fence turns the rest of the page inside out: code becomes prose and prose code."""
import os
import re

from markdown_it import MarkdownIt

README = os.path.join(os.path.dirname(__file__), '..', 'README.md')


def test_every_heading_is_a_heading_and_every_fence_closes():
    text = open(README, encoding='utf-8').read()
    lines = text.splitlines()
    tokens = MarkdownIt('commonmark').parse(text)
    fences = [t for t in tokens if t.type == 'fence']
    assert len(fences) >= 10
    for fence in fences:  # a fence that never closes runs to the end of the page
        assert fence.map[1] <= len(lines) and lines[fence.map[1] - 1].strip() == fence.markup, \
            f'the fence opened on line {fence.map[0] + 1} does not close on a line of its own'
    headings = {t.map[0] for t in tokens if t.type == 'heading_open'}
    in_code = {i for f in fences for i in range(*f.map)}
    looks_like = [i for i, line in enumerate(lines) if re.match(r'#{1,6} ', line) and i not in in_code]
    assert looks_like and [i + 1 for i in looks_like if i not in headings] == []
