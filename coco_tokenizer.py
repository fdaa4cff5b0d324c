"""
coco-caption's tokenizer without Java. coco-caption (pycocoevalcap's PTBTokenizer) runs Stanford CoreNLP
3.4.1's PTBTokenizer, a Java program, once over all the captions, one a line (-preserveLines -lowerCase), and
then drops the punctuation tokens. Here nltk's Treebank tokenizer does the work, with the same Penn Treebank
conventions ("child 's", "is n't", "can not", "gon na", "-lrb-"), after a few fixes to the text, each for one
thing that the Java program does and nltk's does not.

Measured against the Java program: the same words on every real caption beside the repository (the 760 of
../shared/data; a test checks it) and on 85,723 of 85,724 COCO val2014 captions, and so the same BLEU, CIDEr-D
and ROUGE-L. The one real caption that differs: "A seafood po'boy sandwich" (Java: po boy, as it splits an
apostrophe inside a word it does not know). eval_bleu.py --official=True runs the Java program itself.

Where they differ on tests/tricky_captions.json (21 of its 189 captions, listed in tests/test_eval_bleu.py):
- tokens that Java keeps whole and nltk splits: US$10 (us$ 10), the smileys :) :( ;-) :D, URLs, e-mail
  addresses, @user, #tag, C#, the phone number (555) 123-4567, SGML tags <b> </b>, the HTML entities
  &mdash; &amp; &#39;, and << and >>;
- symbols outside ASCII that Java maps to ASCII (½ 1/2, ¼ 1/4, £ #, € $, ¢ cents) or splits off (¥ ° ™ ¡ „);
- apostrophes: '99 before a period or at the end of the last caption (Java: 99), rock'n'roll (Java: rock 'n'
  roll), y'all (Java: y' all);
- pro- and anti- (Java keeps their hyphen), etc.a (Java: etc. a), and a file name that ends the last caption
  (5a.jpg; Java: 5a jpg).

    tokenize_all(["A child's t-shirt.", 'At 8:25 we cannot.']) == [['a', 'child', "'s", 't-shirt'],
                                                                   ['at', '8:25', 'we', 'can', 'not']]
"""
import functools
import re

# coco-caption drops these tokens. (Its list also has -LRB- -RRB- -LCB- -RCB-, but it looks them up after
# lower-casing, so a bracket stays, as the word -lrb-.)
PUNCTUATION = {"''", "'", '``', '`', '.', '?', '!', ',', ':', '-', '--', '...', ';'}

# Importing this file costs nothing: its patterns are strings, which re compiles on first use, and nltk is imported
# by the first tokenize_all.

# ----------------------------------------------------------------------------- periods
# nltk splits off only the period that ends its whole text; Java the period that ends any word, except when the
# word is an abbreviation it knows (PTBLexer's lists ABBREV1 and ABBREV2): these keep their period (St. etc.).
ABBREVIATIONS = set('''jan feb mar apr jun jul aug sep sept oct nov dec mon tue tues wed thu thurs fri ala ariz calif
    colo conn ct dak fla ga ind kan kans ky md mich minn mo mont neb nev okla penn tenn va vt wis wisc wyo inc co cos
    corp pty ptys pte ptes ppty pptys ppte pptes ltd plc rt bancorp bhd assn univ intl sys tel est ext sq jr sr bros
    ed.d ph.d blvd rd esq etc al seq bldg mr mrs ms dr drs prof profs sen sens rep reps atty attys lt col gen messrs
    gov govs adm rev maj sgt cpl pvt capt st ste ave pres lieut hon brig cmdr comdr pfc spc supt supts det mt ft adj
    adv asst assoc ens insp mlle mme msgr sfc vs alex wm jos cie cf treas ph invt elec natl mfg mtg dept'''.split())
CAPITALISED = {'az', 'ark', 'del', 'ill', 'la', 'mass', 'miss', 'ore', 'pa', 'tex', 'wash'}  # these only so: Ark.
BEFORE_NUMBER = r'(?i:ca|figs?|prop|nos?|art|bldg|pp|op)\.\s?\d'  # these only before a number: No. 5
ACRONYM = r'[A-Za-z](?:\.[A-Za-z])*'  # and any letter, or letters between periods: B. U.S. e.g.
# ...but a single letter's period before one of these capitalised words ends a sentence: "plan B. The" is B .
SENTENCE_STARTS = set('''A About According Additionally After An As At But Earlier He Her Here However If In It Last
    Many More Mr. Ms. Now Once One Other Our She Since So Some Such That The Their Then There These They This We When
    While What Yet You'''.lower().split())  # (after the capital, in any case: THE, The)
NEXT_WORD = r'\s+([A-Z]\S*)\s'  # (it may start the next caption: Java reads all of them as one text)
# The periods that end a word. (Before , ; or : a period stays on its word in Java too: "bat.,")
WORD_END_PERIODS = r'''(?<![^\s,;:()"])([^\s,;:()"]*?)\.+(?![\w,;:])'''


def split_period(match):
    """A word and its final periods as Java splits them: 'dog . ', but 'St. ', 'U.S. ', 'B. ' (not before The)."""
    word, next_word = match[1], re.compile(NEXT_WORD).match(match.string, match.end())
    keep = (word.lower() in ABBREVIATIONS or word.lower() in CAPITALISED and word[:1].isupper()
            or re.compile(BEFORE_NUMBER).match(match.string, match.start()) or re.fullmatch(ACRONYM, word)
            and not (len(word) == 1 and next_word and next_word[1].lower() in SENTENCE_STARTS))
    return word + ('. ' if keep else ' . ')


# ----------------------------------------------------------------------------- the other fixes
# Characters outside ASCII that Java reads as ASCII: curly quotes, dashes, the ellipsis (and two invisible ones)
UNICODE = str.maketrans({'\u2018': "'", '\u2019': "'", '\u201c': '"', '\u201d': '"', '\u2013': ' -- ',
                         '\u2014': ' -- ', '\u2026': '...', '\u200b': ' ', '\u00ad': ''})
# Where Java keeps in one token a character that nltk would split at, the character is hidden from nltk as a
# code point of Unicode's private use area, and shown again after it. (Java drops those code points, so no text
# keeps one: they mark nothing but what is hidden here, and LINE_END.)
HIDDEN = {'\xa0': '\ue001', '?': '\ue002', '!': '\ue003', '&': '\ue004'}
HIDE, SHOW = str.maketrans(HIDDEN), str.maketrans({hidden: char for char, hidden in HIDDEN.items()})
LINE_END = '\ue000'  # ends each text, in what nltk reads
FIXES = [
    ('[\ue000-\uf8ff\U00010000-\U0010ffff]', ' '),  # Java drops what it does not know: private use, emoji...
    (r'(?<!\S)\.(?=[A-Za-z])', '. '),  # a period that starts a word is a token: .hit is . hit
    # an opening quote before a word is a token ('quoted'), but not that of 's, 'em, 'til, 'cause, 'tis...
    (r"(?<![\w'])'(?=[A-Za-z])(?!(?i:[sdm]|re|ve|ll|em|till?|cause|tis|twas)\b)", "' "),
    (r'(?<![A-Za-z0-9])/|/(?![A-Za-z0-9])', ' / '),  # a slash is a token, but and/or and 1/2 are one word
    (r'(?<=\w)-(?![\w-])|(?<![\w-])-(?=[A-Za-z])', ' - '),  # a hyphen that ends or starts a word is a token
    (r'(\d[.:,]\d+)(?=[A-Za-z])', r'\1 '),  # a number with a point ends before letters: 6:40pm is 6:40 pm
    (r'[=*]+', r' \g<0> '),  # = and * are tokens, and so is a run of them
    (r'[?!]{2,}', lambda run: f' {run[0].translate(HIDE)} '),  # ?? and ?! are tokens (coco-caption keeps them)
    (r'(?<=[A-Z])&(?=[A-Z])', HIDDEN['&']),  # AT&T is one word
    (r'\b(\d{1,4}) (?=\d{1,4}/\d{1,4}\b)', r'\1' + HIDDEN['\xa0'])]  # 3 1/2 is one token, with a no-break space


@functools.cache
def treebank():
    """nltk's Treebank tokenizer, imported on first use (nltk takes about a second to import)."""
    from nltk.tokenize import TreebankWordTokenizer
    return TreebankWordTokenizer()


def tokenize_all(texts):
    """The words of each text, as coco-caption's tokenizer gives them: all the texts in one go, one a line,
    lower-cased, punctuation dropped. (Any white space in a text is a space: coco-caption makes a line break one.)"""
    if not texts:
        return []
    text = '\n'.join(re.sub(r'\s', ' ', text) for text in texts).translate(UNICODE)
    text = re.sub(WORD_END_PERIODS, split_period, text)
    for pattern, replacement in FIXES:
        text = re.sub(pattern, replacement, text)
    # nltk reads the lines 10,000 at a time (it allows each of its regexes 5 s), each ending on LINE_END, which
    # also keeps nltk's own rule for the period that ends its text from the last one (periods are split above)
    lines, words = text.split('\n'), []
    for start in range(0, len(lines), 10000):
        part = ''.join(f'{line} {LINE_END} ' for line in lines[start:start + 10000])
        words += treebank().tokenize(part, convert_parentheses=True)
    text = ' '.join(word for word in map(str.lower, words) if word not in PUNCTUATION)
    return [[word.translate(SHOW) for word in line.split()] for line in text.split(LINE_END)][:len(texts)]


def tokenize_groups(groups):
    """tokenize_all of groups of texts (each image's references), in one go, keeping the groups."""
    flat = iter(tokenize_all([text for group in groups for text in group]))
    return [[next(flat) for _ in group] for group in groups]


def tokenize(text):
    """The words of one text, as coco-caption's tokenizer gives them."""
    return tokenize_all([text])[0]
