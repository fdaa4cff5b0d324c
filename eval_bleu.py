"""
Caption a prepared split from its precomputed features and score the captions the way COCO captioning
papers do: the coco-caption toolkit's BLEU-1..4, CIDEr-D and ROUGE-L, reimplemented here exactly, its
tokenizer included (Stanford's Java PTBTokenizer, rewritten below rule for rule: "child 's", "t-shirt",
"8:25", "can not", "-lrb-"), so the scores equal the toolkit's to 1e-6 without Java:

    python eval_bleu.py --out_dir=out-coco --data_dir=data/coco --split=test

With --official=True the toolkit itself scores them (pycocoevalcap, which needs Java), adding METEOR and,
where it can run, SPICE (it downloads Stanford CoreNLP on first use).

Writes out_dir/metrics_<name>.json and out_dir/captions_<name>.json, named by what was evaluated
(test_beam5, val_greedy_2shot, ...: see evaluation_name), and prints a table.
"""
import contextlib
import functools
import math
import operator
import os
import re
import shutil
import sys
from collections import Counter

import numpy as np

from data import (Captions, FewShotExamples, InputError, check_at_least, check_data_fits_model, decode_caption,
                  first_line, gpt2_tokenizer, input_errors_exit, read_json, read_meta, write_json)

# -----------------------------------------------------------------------------
out_dir = 'out'  # where train.py wrote its checkpoints; the results are written here too
checkpoint = 'best.pt'
data_dir = 'data/coco'
split = 'test'
max_items = 0  # 0: every image (or video) of the split
batch_size = 64
decoding = 'beam'  # 'greedy', 'beam' or 'sample'
beam_width = 5
max_new_tokens = 30
device = ''  # default: cuda when available, else cpu
official = False  # True: score with the coco-caption toolkit itself (needs Java), which adds METEOR and SPICE
shots = 0  # few-shot: this many (image, caption) examples before each image (a model trained with interleave > 1)
shots_split = 'train'  # the prepared split of data_dir the examples come from
shots_seed = 1337  # which examples
# -----------------------------------------------------------------------------


# ----------------------------------------------------------------------------- tokenizer
# coco-caption (pycocoevalcap's PTBTokenizer) tokenizes with Stanford CoreNLP 3.4.1's PTBTokenizer, a Java
# program that it runs over all the captions at once, one per line (-preserveLines -lowerCase), before it drops
# the punctuation tokens. What follows is that tokenizer, rule for rule, so that the scores are coco-caption's to
# the last digit. PTBTokenizer is a JFlex scanner: at each position it tries every rule, the longest match wins
# and a tie goes to the rule listed first. A rule may also require what comes next (JFlex's trailing context),
# which counts in the length of its match but is not part of its token. The rules are PTBLexer.flex's, in its
# order, each checked against the Java program (tests/tricky_captions.json holds the evidence).


def char_class(test):
    """The inside of a regex [...]: the characters that pass test, below U+10000 (all that PTBLexer reads)."""
    ranges, start = [], None
    for code in range(0x10001):
        if code < 0x10000 and test(chr(code)):
            start = code if start is None else start
        elif start is not None:
            ranges.append(f'\\u{start:04x}-\\u{code - 1:04x}')
            start = None
    return ''.join(ranges)


# Java's Character.isLetter and isDigit. (Python knows a newer Unicode: letters and digits added since Unicode 6,
# none of them English, are where this tokenizer and Java's part.)
LETTERS, DIGITS = char_class(str.isalpha), char_class(str.isdecimal)
# what PTBLexer adds to the letters of a word: the soft hyphen, accents and the other marks of many scripts
MARKS = ('\u00ad\u0237-\u024f\u02c2-\u02c5\u02d2-\u02df\u02e5-\u02ff\u0300-\u036f\u0370-\u037d\u0384\u0385\u03cf'
         '\u03f6\u03fc-\u03ff\u0483-\u0487\u04cf\u04f6-\u04ff\u0510-\u0525\u055a-\u055f\u0591-\u05bd\u05bf\u05c1'
         '\u05c2\u05c4\u05c5\u05c7\u0615-\u061a\u063b-\u063f\u064b-\u065e\u0670\u06d6-\u06ef\u06fa-\u06ff\u070f'
         '\u0711\u0730-\u074f\u0750-\u077f\u07a6-\u07b1\u07ca-\u07f5\u07fa\u0900-\u0903\u093c\u093e-\u094e'
         '\u0951-\u0955\u0962\u0963\u0981-\u0983\u09bc-\u09c4\u09c7\u09c8\u09cb-\u09cd\u09d7\u09e2\u09e3'
         '\u0a01-\u0a03\u0a3c\u0a3e-\u0a4f\u0a81-\u0a83\u0abc-\u0acf\u0b82\u0bbe-\u0bc2\u0bc6-\u0bc8\u0bca-\u0bcd'
         '\u0c01-\u0c03\u0c3e-\u0c56\u0d3e-\u0d44\u0d46-\u0d48\u0e30-\u0e3a\u0e47-\u0e4e\u0eb1-\u0ebc\u0ec8-\u0ecd')
# JFlex matches words in any case but character classes as written: [A-Z] below is upper case only, (?i:...)
# any case, so that A(?i:rk) matches Ark and ARK but not ark.
LETTER, DIGIT, ALNUM = f'[{LETTERS}]', f'[{DIGITS}]', f'[{LETTERS}{DIGITS}]'
WORD_LETTER = f'(?:[{LETTERS}{MARKS}]|&[aeiouAEIOU](?i:acute|grave|uml);)'  # HTML's &eacute; too
WORD = f'{WORD_LETTER}(?:{WORD_LETTER}|{DIGIT})*(?:[.!?]{WORD_LETTER}(?:{WORD_LETTER}|{DIGIT})*)*'  # and x.y
SPACE = r'[ \t\u00a0\u2000-\u200a\u3000]'
SPACE_OR_LINE = r'[ \t\u00a0\u2000-\u200a\u3000\n\r\u2028\u2029\x0b\x0c\x85]'
APOSTROPHE = r"(?:['\u0092\u2019]|(?i:&apos;))"
APOSTROPHE_ETC = r"(?:['\u0092\u2019`\u0091\u2018\u201b]|(?i:&apos;))"
CLITIC = f"{APOSTROPHE}(?:[msdMSD]|(?i:re|ve|ll))"  # 's 'm 'd 're 've 'll
NOT = f"(?i:n){APOSTROPHE_ETC}(?i:t)"  # n't
ACRONYM = (r'(?:[A-Za-z](?:\.[A-Za-z])*|(?i:canada|sino|korean|eu|japan|non)-(?i:u\.s)'
           r'|(?i:u\.s\.-(?:u\.k|u\.s\.s\.r)))')
ACRONYM2 = ACRONYM.replace(r'(?:\.[A-Za-z])*', r'(?:\.[A-Za-z])+', 1)  # two letters at least
NUMBER = f'[-+]?(?:{DIGIT}*(?:[.:,\u00ad\u066b\u066c]{DIGIT}+)+|{DIGIT}+)'  # 1,000 3.5 8:25 -5 .5
THING_PART = f'(?:[dDoOlL]{APOSTROPHE_ETC}{ALNUM})?{ALNUM}+'  # 10am, o'clock, d'Avignon
THING = f'{THING_PART}(?:[-_\u058a\u2010\u2011]{THING_PART})*'  # 9-year-old, snake_case
HYPHENATED = f'[A-Za-z0-9][A-Za-z0-9.,\u00ad]*(?:-(?:{ACRONYM2}\\.|[A-Za-z0-9\u00ad]+))+'  # t-shirt, pro-U.S.
CAPS_AND = r'[A-Z]+(?:(?:[+&]|(?i:&amp;))[A-Z]+)+'  # AT&T
IN_SENTENCE = '[,;:\u3001]'
SGML_NAME = '[A-Za-z][A-Za-z0-9_:.-]*'
SGML = (f'<(?:[!?][A-Za-z-][^>\\r\\n]*|{SGML_NAME}(?: +{SGML_NAME}(?: *= *(?:\'[^\']*\'|"[^"]*"))?)* */?'
        f'|/{SGML_NAME}) *>')  # <b> </b> <a href="x">
APOSTROPHE_WORD = (  # ma'am, 'em, '90s, 'til, rock 'n' roll, l' and d' (French), o'o
    f"{APOSTROPHE}(?i:n){APOSTROPHE}?|[lLdDjJ]{APOSTROPHE}|(?i:dunkin|somethin|ol){APOSTROPHE}|{APOSTROPHE}(?i:em)"
    f"|{APOSTROPHE}[2-9]0(?i:s)|{APOSTROPHE}(?i:till?|cause)|[A-HJ-XZn]{APOSTROPHE_ETC}{LETTER}{{2}}{LETTER}*"
    f"|{LETTER}+[aeiouyAEIOUY]{APOSTROPHE_ETC}[aeiouA-Z]{LETTER}*"
    f"|(?i:cont'd\\.?|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l|o{APOSTROPHE_ETC}o)")
URL = r'(?i:https?)://[^ \t\n\f\r"<>|(){}]+[^ \t\n\f\r"<>|.!?(){},-]'
# ",-_" is a range in PTBLexer's class (where ",-_" was meant), so such a name cannot start with a digit or capital
LIKELY_URL = (r'(?:(?i:www)\.(?:[^ \t\n\f\r"<>|.!?(){},]+\.)+[a-zA-Z]{2,4}'
              r'|(?:[^ \t\n\f\r"`\'<>|.!?(){},-_$]+\.)+(?i:com|net|org|edu))'
              r'(?:/[^ \t\n\f\r"<>|()]+[^ \t\n\f\r"<>|.!?(){},-])?')
EMAIL = (r'(?:<|(?i:&lt;))?[a-zA-Z0-9][^ \t\n\f\r"<>|(){}\u00a0]*@(?:[^ \t\n\f\r"<>|(){}.\u00a0]+\.)*'
         r'[^ \t\n\f\r"<>|(){}.\u00a0]+(?:>|(?i:&gt;))?')
FILENAME = (f'[{LETTERS}{DIGITS}\u00ad]+(?:\\.[{LETTERS}{DIGITS}\u00ad]+)*\\.(?i:bat|bmp|c|class|cgi|cpp|dll|docx?'
            '|exe|gif|gz|h|html?|jar|java|jpe?g|mov|mp3|pdf|php|pl|png|ppt|ps|py|sql|tar|txt|wav|x|xml|zip)')
PHONE = (r'(?:\([0-9]{2,3}\)[ \u00a0]?|(?:\+\+?)?(?:[0-9]{2,4}[- \u00a0])?[0-9]{2,4}[- \u00a0])[0-9]{3,4}'
         r'[- \u00a0]?[0-9]{3,5}|(?:(?:\+\+?)?[0-9]{2,4}\.)?[0-9]{2,4}\.[0-9]{3,4}\.[0-9]{3,5}')
# Abbreviations that keep their period. PTBLexer takes ABBREV1 ones to be followed by a lower-case word, ABBREV2
# ones by a capitalised one, and ABBREV3 ones only before a number. M(?i:iss) is Miss. but not miss.
ABBREV1 = ('(?:(?i:jan|feb|mar|apr|jun|jul|aug|sept?|oct|nov|dec|mon|tues?|wed|thu|thurs|fri'
           '|ala|ariz|calif|colo|conn|ct|dak|fla|ga|ind|kans?|ky|md|mich|minn|mo|mont|neb|nev|okla|penn|tenn|va|vt'
           '|wisc?|wyo|inc|cos?|corp|pp?t[ye]s?|ltd|plc|rt|bancorp|bhd|assn|univ|intl|sys|tel|est|ext|sq'
           '|jr|sr|bros|(?:ed|ph)\\.d|blvd|rd|esq|etc|al|seq|bldg)'
           '|A(?i:z|rk)|D(?i:el)|I(?i:ll)|L(?i:a)|M(?i:ass|iss)|O(?i:re)|P(?i:a)|T(?i:ex)|W(?i:ash))\\.')
ABBREV2 = ('(?:(?i:mr|mrs|ms|drs?|profs?|sens?|reps?|attys?|lt|col|gen|messrs|govs?|adm|rev|maj|sgt|cpl|pvt|capt'
           '|ste?|ave|pres|lieut|hon|brig|co?mdr|pfc|spc|supts?|det|mt|ft|adj|adv|asst|assoc|ens|insp|mlle|mme|msgr'
           f'|sfc|vs|alex|wm|jos|cie|a\\.k\\.a|cf|treas|ph|invt|elec|natl|m[ft]g|dept)|M(?i:iss)|{ACRONYM})\\.')
ABBREV3 = r'(?i:ca|figs?|prop|nos?|art|bldg|pp|op)\.'
# After an acronym, one of these capitalised words starts a sentence: "B. The" is B and a period.
SENTENCE_START = ('A(?i:bout|ccording|dditionally|fter|n|s|t)?|B(?i:ut)|E(?i:arlier)|H(?i:e|er|ere|owever)'
                  '|I(?i:f|n|t)|L(?i:ast)|M(?i:any|ore|r\\.|s\\.)|N(?i:ow)|O(?i:nce|ne|ther|ur)'
                  '|S(?i:he|ince|o|ome|uch)|T(?i:hat|he|heir|hen|here|hese|hey|his)|W(?i:e|hen|hile|hat)|Y(?i:et|ou)')
SYMBOLS = ('+%&~^|\\\\\u00a6-\u00a9\u00ac\u00ae-\u00ba\u00d7\u00f7\u0387\u05be\u05c0\u05c3\u05c6\u05f3\u05f4'
           '\u0600-\u0603\u0606-\u060a\u060c\u0614\u061b\u061e\u066a\u066d\u0703-\u070d\u07f6-\u07f8\u0964\u0965'
           '\u0e4f\u1fbd\u2016\u2017\u2020-\u2023\u2030-\u2038\u203b\u203e-\u2042\u2044\u207a-\u207f\u208a-\u208e'
           '\u2100-\u214f\u2190-\u21ff\u2200-\u2bff\u3012\u30fb\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65')
QUOTES = '`\u2018\u2019\u201a\u201b\u201c\u201d\u0091-\u0094\u201e\u201f\u2039\u203a\u00ab\u00bb'
FRACTIONS = {'\u00bc': '1/4', '\u00bd': '1/2', '\u00be': '3/4', '\u2153': '1/3', '\u2154': '2/3'}
CURRENCIES = {'\u00a2': 'cents', '\u00a3': '#', '\u0080': '$', '\u00a4': '$', '\u20a0': '$', '\u20ac': '$'}
BRACKETS = {'(': '-LRB-', ')': '-RRB-', '[': '-LSB-', ']': '-RSB-', '{': '-LCB-', '}': '-RCB-'}


def latex_quotes(text, opening=False):
    """Quotes as the Penn Treebank writes them: ` and `` open, ' and '' close."""
    text = re.sub(r"'|(?i:&apos;)", '`' if opening else "'", text)
    text = re.sub(r'"|(?i:&quot;)', '``' if opening else "''", text)
    for chars, quote in [('\u0091\u2018\u201b\u2039', '`'), ('\u0092\u2019\u203a', "'"),
                         ('\u0093\u201c\u00ab', '``'), ('\u0094\u201d\u00bb', "''")]:
        text = re.sub(f'[{chars}]', quote, text)
    return text


def opening_quotes(text):
    return latex_quotes(text, opening=True)


def no_soft_hyphens(text):
    return text.replace('\u00ad', '') or '-'


def no_spaces(text):  # a token never holds a space: 3 1/2 is one token, with a no-break space
    return text.replace(' ', '\u00a0')


def paren_names(text):  # :) is :-RRB-
    return text.replace('(', '-LRB-').replace(')', '-RRB-')


def ampersand(text):
    return re.sub('(?i:&amp;)', '&', text)


SKIP, NEW_LINE = 'skip', 'new line'
# (pattern, what must come next or None, the token: None for the text itself, a string, or a function of the text)
PTB_RULES = [
    ('(?i:can)', '(?i:not)', None),  # cannot: can not
    ('(?i:gon|wan)', '(?i:na)', None), ('(?i:got)', '(?i:ta)', None), ('(?i:lem|gim)', '(?i:me)', None),  # gon na
    ("'(?i:t)", '(?i:is|was)', None),  # 't is
    (r'(?i:c\+\+|[cf]#)', None, None),
    (SGML, None, no_spaces),
    (r'(?i:&(?:md|mdash|ndash);)|[\u0096\u0097\u2013\u2014\u2015]', None, '--'),
    (r'(?i:&amp;)', None, '&'),
    (r'(?i:&(?:ht|tl|ur|lr|qc|ql|qr|odq|cdq|#[0-9]+);)', None, None),
    (WORD, CLITIC, no_soft_hyphens),  # child 's
    (r'[A-Za-z\u00ad]*[A-MO-Za-mo-z]\u00ad*', NOT, no_soft_hyphens),  # is n't, ca n't
    (WORD, None, no_soft_hyphens),
    (APOSTROPHE_WORD, None, None),
    (f'(?i:y){APOSTROPHE}', LETTER, None),  # y' all
    (URL, None, None),
    (LIKELY_URL, None, None),
    (EMAIL, None, None),
    (f'@[a-zA-Z_][a-zA-Z_0-9]*|#{WORD_LETTER}+', None, None),  # @user #tag
    (CLITIC, '[^A-Za-z]', latex_quotes),
    (NOT, None, latex_quotes),
    (f'{DIGIT}{{1,2}}[-/]{DIGIT}{{1,2}}[-/]{DIGIT}{{2,4}}', None, None),  # 12/25/2014
    (NUMBER, None, no_soft_hyphens),
    ('[\u207a\u207b\u208a\u208b]?(?:[\u2070\u00b9\u00b2\u00b3\u2074-\u2079]+|[\u2080-\u2089]+)', None, None),
    (f'(?:{DIGIT}{{1,4}}[- \u00a0])?{DIGIT}{{1,4}}(?:\\\\?/|\u2044){DIGIT}{{1,4}}', None, no_spaces),  # 3 1/2
    ('[\u00bc\u00bd\u00be\u2153-\u215e]', None, lambda text: FRACTIONS.get(text, text)),  # ½ is 1/2
    (f'-(?:RRB|LRB|RCB|LCB|RSB|LSB)-|C\\.D\\.s|(?i:pro|anti)-|S(?:&|&amp;)P-500|S(?:&|&amp;)Ls'
     f'|(?i:cap){APOSTROPHE}n|(?i:c){APOSTROPHE}(?i:est)', None, ampersand),
    (r'[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}', None, None),  # and/or
    (r'[A-Z]*\$|#', None, None),  # $ US$
    ('[\u00a2-\u00a5\u0080\u20a0\u20ac\u060b\u0e3f\u20a4\uffe0\uffe1\uffe5\uffe6]', None,
     lambda text: CURRENCIES.get(text, text)),  # € is $
    (f'{ACRONYM}\\.', f'{SPACE_OR_LINE}+(?:{SENTENCE_START}){SPACE_OR_LINE}',
     lambda text: text[0] if len(text) == 2 else text),  # (its period is read again, and dropped)
    (ABBREV3, f'{SPACE_OR_LINE}?{DIGIT}', None),  # No. 5
    (ABBREV1, r'[\s\S]{2}', None),  # (the two characters only make it longer than a WORD like etc.x)
    (ABBREV1, None, None),
    (ABBREV2, None, None),
    (f'{APOSTROPHE}[0-9][0-9]', SPACE_OR_LINE, None),  # '99
    (FILENAME, f'{SPACE_OR_LINE}|[.?!,]', None),  # 5a.jpg
    (f'{WORD}\\.', IN_SENTENCE, no_soft_hyphens),  # May., (a period before , ; : stays on its word)
    (PHONE, None, lambda text: paren_names(no_spaces(text))),
    (r'"|(?i:&quot;)', '[A-Za-z0-9$]', opening_quotes),
    (r'"|(?i:&quot;)', None, latex_quotes),
    ('\x7f', None, SKIP),
    (r'<|(?i:&lt;)', None, '<'),
    (r'>|(?i:&gt;)', None, '>'),
    (r"[<>]?[:;=][-o*']?[()DPdpO\\{@|\[\]]", '[^A-Za-z0-9]', paren_names),  # :) ;-(
    (r"[-^x=~<>']_[-^x=~<>']|\([-^x=~<>'][_.]?[-^x=~<>']\)|\([\^x=~<>']-[\^x=~<>'`]\)", None, paren_names),  # ^_^
    (r'[()\[\]{}]', None, BRACKETS.get),
    (r'-+', None, lambda text: '--' if 3 <= len(text) <= 4 else text),
    (r'\.{3,5}|(?:\.[ \u00a0]){2,4}\.|[\u0085\u2026]', None, '...'),  # (.. is two periods)
    (r'@+|#+|_+', None, None),
    (r'\*+|(?:\\\*){1,3}', None, None),
    (IN_SENTENCE, None, None),
    (r'[?!]+', None, None),
    ('[.\u00a1\u00bf\u037e\u0589\u061f\u06d4\u0700-\u0702\u07fa\u3002]', None, None),
    ('=', None, None),
    ('/', None, None),
    (f'{HYPHENATED}\\.', IN_SENTENCE, no_soft_hyphens),
    (HYPHENATED, None, no_soft_hyphens),
    (f'{THING}\\.', IN_SENTENCE, None),
    (THING, None, None),
    (f'{CAPS_AND}\\.', IN_SENTENCE, ampersand),
    (CAPS_AND, None, ampersand),
    ("'", r'[A-Za-z][^ \t\n\r\u00a0]', opening_quotes),  # 'quoted'
    (CLITIC, None, latex_quotes),
    (f"[{QUOTES}]{{1,2}}|''|{APOSTROPHE}", None, latex_quotes),
    ('<<|>>', None, None),
    (f'[{SYMBOLS}]', None, None),
    (f'\x00|{SPACE}+|[\u200b\u200e\u200f\ufeff]|(?i:&nbsp;)', None, SKIP),
    (r'\r\n?|[\n\u2028\u2029\x0b\x0c\x85]', None, NEW_LINE),
    (r'[\s\S]', None, SKIP),  # a character PTBLexer does not know (an emoji, say) is dropped
]
# Shortcuts for what no rule can change, most of a caption: words of plain letters followed by spaces (or by
# , ; : ! ? and a space), spaces, a line break, and a lone , ; : or . before a space.
PLAIN_WORD = '(?!(?i:cannot|gonna|gotta|lemme|gimme|wanna)(?![A-Za-z]))[A-Za-z]+'
PTB_SHORTCUTS = re.compile(f'(?P<words>(?:{PLAIN_WORD}[ \\t]{SPACE}*)+)|(?P<line>\\n)|[ \\t]{SPACE}*'
                           f'|(?P<token>{PLAIN_WORD}(?=[,;:!?]*(?:[ \\t\\n]|\\Z))'
                           f'|[,;:](?=[ \\t\\n]|\\Z)|\\.(?=[ \\t][^.]|\\n|\\Z))')


@functools.cache
def ptb_scanner():
    """All the rules as one regex (compiled on first use), each rule an optional lookahead whose groups record
    where its token and its context end; per rule (its token's group, its action); and a function picking from
    a match's group spans each rule's (start, end) (of its context if it has one; (-1, -1) where it failed)."""
    pattern, rules, end_groups, group = '', [], [], 0
    for text, context, action in PTB_RULES:
        pattern += f'(?:(?=({text})' + (f'({context})' if context else '') + ')|)'
        rules.append((group + 1, action))
        end_groups.append(group + 1 + bool(context))
        group += 1 + bool(context)
    return re.compile(pattern), rules, operator.itemgetter(*end_groups)


def ptb_lex(text):
    """PTBLexer's tokens of text, a list per line."""
    scanner, rules, rule_spans = ptb_scanner()
    lines, pos = [[]], 0
    while pos < len(text):
        shortcut = PTB_SHORTCUTS.match(text, pos)
        if shortcut:
            if shortcut.lastgroup == 'words':
                lines[-1] += shortcut.group().split()
            elif shortcut.lastgroup == 'line':
                lines.append([])
            elif shortcut.lastgroup == 'token':
                lines[-1].append(shortcut.group())
            pos = shortcut.end()
            continue
        spans = scanner.match(text, pos).regs  # the (start, end) of every group
        ends = rule_spans(spans)
        group, action = rules[ends.index(max(ends, key=operator.itemgetter(1)))]  # longest, first of equals
        token = text[spans[group][0]:spans[group][1]]
        if action == NEW_LINE:
            lines.append([])
        elif action != SKIP:
            lines[-1].append(token if action is None else action if isinstance(action, str) else action(token))
        pos = spans[group][1]
    return lines


# coco-caption drops these tokens. Its list also has -LRB- -RRB- -LCB- -RCB-, but it looks them up after
# lower-casing, so a bracket stays, as the word -lrb-.
PUNCTUATION = {"''", "'", '``', '`', '.', '?', '!', ',', ':', '-', '--', '...', ';'}
LINE_BREAKS = re.compile('[\n\r\x0b\x0c\u2028\u2029]')


def tokenize_all(texts):
    """The words of each text as coco-caption's tokenizer gives them: all the texts in one go, one per line,
    lower-cased, punctuation dropped. (A caption's line breaks become spaces: coco-caption replaces only \\n,
    and any other would split the caption in two and shift every caption after it by a line.)"""
    if not texts:
        return []
    lines = ptb_lex('\n'.join(LINE_BREAKS.sub(' ', text) for text in texts))
    lines = [' '.join(map(str.lower, line)).rstrip() for line in lines]  # Java's output, as coco-caption reads it
    return [[word for word in line.split(' ') if word and word not in PUNCTUATION] for line in lines]


def tokenize_groups(groups):
    """tokenize_all of groups of texts (each image's references), in one go, keeping the groups."""
    flat = iter(tokenize_all([text for group in groups for text in group]))
    return [[next(flat) for _ in group] for group in groups]


def tokenize(text):
    """The words of one caption, as coco-caption's tokenizer gives them."""
    return tokenize_all([text])[0]


def ngrams(words, n):
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def bleu(hypotheses, references, max_n=4):
    """Corpus BLEU-1..max_n: n-gram counts clipped by the most any one reference has, brevity penalty
    against the closest reference length, summed over the corpus. hypotheses: [words],
    references: [[words]]. The two tiny constants are coco-caption's, kept for equal scores."""
    tiny, small = 1e-15, 1e-9
    correct, guessed = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for hyp, refs in zip(hypotheses, references):
        hyp_len += len(hyp)
        ref_len += min((len(r) for r in refs), key=lambda n: (abs(n - len(hyp)), n))
        for n in range(1, max_n + 1):
            most = Counter()
            for ref in refs:
                most |= ngrams(ref, n)  # the largest count of each n-gram in any one reference
            correct[n - 1] += sum(min(count, most[gram]) for gram, count in ngrams(hyp, n).items())
            guessed[n - 1] += max(len(hyp) - n + 1, 0)
    scores, product = [], 1.0
    for n in range(max_n):
        product *= (correct[n] + tiny) / (guessed[n] + small)
        scores.append(product ** (1 / (n + 1)))
    ratio = (hyp_len + tiny) / (ref_len + small)
    brevity = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    return [s * brevity for s in scores]


class CiderD:
    """
    CIDEr-D: tf-idf weighted n-gram cosine similarity, with clipped counts and a Gaussian penalty on the
    length difference, x10 - as coco-caption computes it, including its use of the bigram count as a
    caption's "length". The idf comes from a corpus of references given once: coco-caption's is the
    evaluated captions' own references (cider_d); a reward for training (SCST) takes the training split's.
    """

    def __init__(self, corpus, max_n=4, sigma=6.0):
        """corpus: [[words] of each reference] of each image."""
        self.max_n, self.sigma = max_n, sigma
        self.doc_freq = Counter(g for refs in corpus for g in set().union(*map(self.counts, refs)))
        self.log_docs = math.log(len(corpus))

    def counts(self, words):
        return Counter(g for n in range(1, self.max_n + 1) for g in ngrams(words, n).elements())

    def vector(self, words):
        vec = [{} for _ in range(self.max_n)]
        norm = [0.0] * self.max_n
        counts = self.counts(words)
        for gram, tf in counts.items():
            weight = tf * (self.log_docs - math.log(max(1.0, self.doc_freq[gram])))
            vec[len(gram) - 1][gram] = weight
            norm[len(gram) - 1] += weight ** 2
        length = sum(tf for gram, tf in counts.items() if len(gram) == 2)
        return vec, [math.sqrt(x) for x in norm], length

    def image_scores(self, hypotheses, references):
        """The CIDEr-D of each of several hypotheses [words] of one image against its references [[words]],
        whose vectors are computed once (SCST scores several samples of each image)."""
        refs = [self.vector(ref) for ref in references]
        scores = []
        for hyp in hypotheses:
            vec, norm, length = self.vector(hyp)
            total = np.zeros(self.max_n)
            for ref_vec, ref_norm, ref_length in refs:
                penalty = math.exp(-((length - ref_length) ** 2) / (2 * self.sigma ** 2))
                for n in range(self.max_n):
                    value = sum(min(w, ref_vec[n].get(g, 0.0)) * ref_vec[n].get(g, 0.0) for g, w in vec[n].items())
                    if norm[n] and ref_norm[n]:
                        value /= norm[n] * ref_norm[n]
                    total[n] += value * penalty
            scores.append(10.0 * total.mean() / len(refs))
        return scores

    def scores(self, hypotheses, references):
        """The CIDEr-D of each hypothesis [words] against its references [[words]]."""
        return [self.image_scores([hyp], refs)[0] for hyp, refs in zip(hypotheses, references)]


def cider_d(hypotheses, references):
    """Corpus CIDEr-D as coco-caption reports it: the mean over captions, idf from these references."""
    return float(np.mean(CiderD(references).scores(hypotheses, references)))


def lcs_length(a, b):
    row = [0] * (len(b) + 1)
    for x in a:
        previous_diagonal = 0
        for j, y in enumerate(b, 1):
            previous_diagonal, row[j] = row[j], previous_diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(hypotheses, references, beta=1.2):
    """ROUGE-L: F-measure (beta 1.2) of the longest common subsequence, taking the best precision and
    the best recall over the references, averaged over captions."""
    scores = []
    for hyp, refs in zip(hypotheses, references):
        lcs = [lcs_length(hyp, ref) for ref in refs]
        precision = max(l / len(hyp) if hyp else 0.0 for l in lcs)
        recall = max(l / len(ref) for l, ref in zip(lcs, refs))
        scores.append((1 + beta ** 2) * precision * recall / (recall + beta ** 2 * precision)
                      if precision and recall else 0.0)
    return float(np.mean(scores))


def score(captions, references):
    """{metric: value} for captions [str] against references [[str]], as coco-caption scores them."""
    # coco-caption tokenizes the captions in one go and the references in another, then hands its scorers each
    # caption as a string of words: BLEU and CIDEr split it at any white space, ROUGE-L at ' ' alone (they
    # differ only for a token that holds a no-break space, like 3 1/2, and for an empty caption).
    hyps = [' '.join(words) for words in tokenize_all(captions)]
    refs = [[' '.join(words) for words in rs] for rs in tokenize_groups(references)]
    split = lambda how: ([how(h) for h in hyps], [[how(r) for r in rs] for rs in refs])
    metrics = {f'BLEU-{n}': b for n, b in enumerate(bleu(*split(str.split)), 1)}
    metrics['CIDEr-D'] = cider_d(*split(str.split))
    metrics['ROUGE-L'] = rouge_l(*split(lambda words: words.split(' ')))
    return metrics


# A caption that ends on one of these stopped mid-phrase ("a dog on a"): self-critical.pytorch's list, and "and"
BAD_ENDINGS = {'a', 'an', 'the', 'in', 'for', 'at', 'of', 'with', 'before', 'after', 'on', 'upon', 'near', 'to', 'is',
               'are', 'am', 'and'}


def bad_endings(captions):
    """The share of captions whose last word is a function word: a sign that training on CIDEr-D taught the
    model to stop early (self-critical.pytorch reports it as bad_count_rate)."""
    return sum(bool(words) and words[-1] in BAD_ENDINGS for words in tokenize_all(captions)) / max(len(captions), 1)


# ----------------------------------------------------------------------------- right about the picture?
# BLEU and CIDEr-D reward a caption for sounding like the references, not for being right: "a big red square"
# over a red circle scores well. The shapes demo's captions file keeps every picture's scene (each shape's colour
# and kind) and the words for them, so a caption's (colour, shape) pairs can be checked against the picture.

def scenes(captions_path):
    """{image id: [(colour, kind) of each shape]} and the words of colours and kinds ({words: kind}) of a captions
    file that keeps its scenes (prepare_shapes.py writes them), else None."""
    coco = read_json(captions_path) if captions_path else None
    info = coco.get('info') if isinstance(coco, dict) else None
    if not isinstance(info, dict) or 'kinds' not in info:
        return None
    kind_of = {tuple(words.split()): kind for kind, synonyms in info['kinds'].items() for words in synonyms}
    pictures = {image['id']: [(shape['colour'], shape['kind']) for shape in image['scene']] for image in coco['images']}
    return pictures, set(info['colours']), dict(sorted(kind_of.items(), key=lambda item: -len(item[0])))


def named_pairs(words, colours, kind_of):
    """The (colour, kind) pairs a caption's words name: a colour right before the words of a kind ('a big red
    round shape' names (red, circle)), or their plural."""
    pairs = []
    for i, word in enumerate(words):
        if word not in colours:
            continue
        for phrase, kind in kind_of.items():  # the longest phrases first
            following = words[i + 1:i + 1 + len(phrase)]
            plurals = [[phrase[-1] + end] for end in ('', 's', 'es')]
            if following[:-1] == list(phrase[:-1]) and following[-1:] in plurals:
                pairs.append((word, kind))
                break
    return pairs


def scene_shares(captions, ids, pictures, colours, kind_of):
    """Of the (colour, shape) pairs the captions name, the share that is in the picture; of the pictures' shapes,
    the share that their caption names."""
    right = named = shapes = mentioned = 0
    for words, image_id in zip(tokenize_all(captions), ids):
        pairs, picture = named_pairs(words, colours, kind_of), pictures[image_id]
        right += sum(pair in picture for pair in pairs)
        named += len(pairs)
        shapes += len(picture)
        mentioned += sum(shape in pairs for shape in picture)
    return dict(pairs_right=right / max(named, 1), shapes_named=mentioned / max(shapes, 1))


def require_official_toolkit():
    """Raise an InputError unless coco-caption's toolkit can run: pycocoevalcap, and Java for its tokenizer."""
    try:
        import pycocoevalcap.tokenizer.ptbtokenizer  # noqa: F401
        toolkit = True
    except ImportError:
        toolkit = False
    if shutil.which('java') is None or not toolkit:
        raise InputError('--official=True needs Java (java on PATH) and pycocoevalcap (pip install pycocoevalcap)')


def official_scores(captions, references):
    """{metric: value} from the coco-caption toolkit itself (pycocoevalcap): its Java PTB tokenizer, then
    BLEU-1..4, CIDEr-D, ROUGE-L, METEOR (Java) and SPICE (Java; left out, with a line on stderr, where it
    cannot run). The first four equal score()'s."""
    require_official_toolkit()
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    refs = PTBTokenizer().tokenize({i: [{'caption': r} for r in rs] for i, rs in enumerate(references)})
    hyps = PTBTokenizer().tokenize({i: [{'caption': c}] for i, c in enumerate(captions)})
    metrics = {f'BLEU-{n}': b for n, b in enumerate(Bleu(4).compute_score(refs, hyps, verbose=0)[0], 1)}
    metrics['CIDEr-D'] = Cider().compute_score(refs, hyps)[0]
    metrics['ROUGE-L'] = Rouge().compute_score(refs, hyps)[0]
    metrics['METEOR'] = official_meteor(refs, hyps)
    spice = official_spice(refs, hyps)
    if spice is not None:
        metrics['SPICE'] = spice
    return {name: float(value) for name, value in metrics.items()}


def official_meteor(refs, hyps):
    """pycocoevalcap's METEOR, its Java process stopped whatever happens."""
    from pycocoevalcap.meteor.meteor import Meteor
    scorer = Meteor()
    try:
        return scorer.compute_score(refs, hyps)[0]
    finally:
        if scorer.lock.locked():  # compute_score failed holding its lock, which Meteor.__del__ would wait for
            scorer.lock.release()
        scorer.meteor_p.kill()
        scorer.meteor_p.wait()


def official_spice(refs, hyps):
    """pycocoevalcap's SPICE, or None with a line on stderr saying why it could not run. It downloads Stanford
    CoreNLP on first use and needs 8 GB for its Java process."""
    try:
        from pycocoevalcap.spice.spice import Spice
        with contextlib.redirect_stdout(sys.stderr):  # its download messages
            scorer = Spice()
    except Exception as e:
        print(f'eval_bleu.py: SPICE skipped: {first_line(e)} (SPICE needs Stanford CoreNLP, which pycocoevalcap '
              'downloads on first use)', file=sys.stderr)
        return None
    try:
        return scorer.compute_score(refs, hyps)[0]
    except Exception as e:
        print(f'eval_bleu.py: SPICE skipped: its Java program failed ({first_line(e)})', file=sys.stderr)
        return None


def evaluation_name():
    """What was evaluated, which names its files: split, decoding and shots, and the checkpoint when it is not
    best.pt (test_beam5, val_greedy_2shot, test_sample_ckpt, ...). Each evaluation keeps its own files."""
    parts = [split, f'beam{beam_width}' if decoding == 'beam' else decoding] + [f'{shots}shot'] * bool(shots)
    if checkpoint != 'best.pt':
        parts.append(os.path.splitext(os.path.basename(checkpoint))[0])
    return '_'.join(parts)


def evaluation_settings():
    """Every setting that made the captions, for the metrics file."""
    settings = dict(checkpoint=checkpoint, split=split, decoding=decoding, max_new_tokens=max_new_tokens, shots=shots)
    if decoding == 'beam':
        settings['beam_width'] = beam_width
    if shots:  # where the examples came from
        settings.update(shots_split=shots_split, shots_seed=shots_seed)
    return settings


def caption_split(model, data_dir, split_name, count, batch, decode_options, dev, examples=None):
    """Captions of the first `count` images or videos of a prepared split (all if 0), and their records
    (file, id, reference captions). examples: a data.FewShotExamples of the same data_dir, whose examples
    go before each image (never the image itself)."""
    import torch
    import decode
    data = Captions(data_dir, split_name, max_tokens=1)
    records = data.records()
    count = min(count or len(records), len(records))
    encoder = gpt2_tokenizer()
    # the images that get the same examples are captioned together
    if examples is None:
        groups = {(): range(count)}
    else:
        same_split = examples.split == split_name
        groups = examples.groups(range(count), lambda i, media, record: same_split and media == i)
    captions = [None] * count
    for chosen, group in groups.items():
        shots = examples.shots_of(chosen, dev) if examples is not None else None
        for start in range(0, len(group), batch):
            ids = np.array(group[start:start + batch])
            features, mask = (torch.from_numpy(a).to(dev) for a in data.features(ids))
            for i, tokens in zip(ids, decode.generate(model, features, mask, shots=shots, **decode_options)):
                captions[i] = decode_caption(encoder, tokens)
    return captions, records[:count]


if __name__ == '__main__':
    from configurator import configure, is_setting
    from data import pick_device
    from decode import check_decoding, onednn_linears
    from weights import load_captioner
    globals().update(configure({k: v for k, v in globals().items() if is_setting(k, v)}))
    with input_errors_exit('eval_bleu.py'):
        check_decoding(decoding, max_new_tokens, beam_width)
        check_at_least(max_items=(max_items, 0), batch_size=(batch_size, 1), shots=(shots, 0))
        if official:
            require_official_toolkit()  # before the captioning, not after
        dev = pick_device(device)
        model = onednn_linears(load_captioner(os.path.join(out_dir, checkpoint), dev)[0])
        check_data_fits_model(read_meta(data_dir), model, data_dir)
        options = dict(decoding=decoding, beam_width=beam_width, max_new_tokens=max_new_tokens)
        examples = FewShotExamples(data_dir, shots_split, shots, shots_seed) if shots else None
        captions, records = caption_split(model, data_dir, split, max_items, batch_size, options, dev, examples)
    with input_errors_exit('eval_bleu.py'):
        metrics = (official_scores if official else score)(captions, [r['captions'] for r in records])
    metrics['bad_endings'] = bad_endings(captions)
    with input_errors_exit('eval_bleu.py'):
        known = scenes(read_meta(data_dir)['splits'][split].get('source', {}).get('captions'))
    if known:  # the shapes: is each caption right about its picture?
        metrics.update(scene_shares(captions, [r['id'] for r in records], *known))
    name = evaluation_name()
    write_json(os.path.join(out_dir, f'metrics_{name}.json'), dict(**evaluation_settings(), items=len(records),
                                                                   **metrics))
    write_json(os.path.join(out_dir, f'captions_{name}.json'), [dict(file=r['file'], id=r['id'], caption=c)
                                                               for r, c in zip(records, captions)])
    print(f'{split}: {len(records):,} captioned, {decoding} decoding' + (f', {shots}-shot' if shots else '')
          + f' (captions and scores: {out_dir}/captions_{name}.json, metrics_{name}.json)')
    for name, value in metrics.items():
        print(f'{name:<11} {100 * value:6.2f}')  # x100, as papers report them (bad endings: a percentage)
