"""Helpers of the attnlab_wikitext task (lm-eval loads this file by path through `!function`).

`wikitext_detokenizer` and `process_results` are lm-eval's own (lm_eval/tasks/wikitext, MIT), so
the numbers mean what they mean there; `wikitext_articles` replaces the document-level dataset.
"""

import re

_TITLE = re.compile(r"^ = [^=].* = $")   # " = Homarus gammarus = "; sections are " = = ... = = "


def wikitext_articles(dataset):
    """One row per article of a raw WikiText file (read as one document): a new article starts at
    each top-level heading line; blank lines before the first heading are dropped."""
    import datasets

    pages = []
    for doc in dataset["text"]:
        page = []
        for line in doc.splitlines(keepends=True):
            if _TITLE.match(line.rstrip("\n")) and any(s.strip() for s in page):
                pages.append("".join(page))
                page = []
            if page or line.strip():
                page.append(line)
        if any(s.strip() for s in page):
            pages.append("".join(page))
    return datasets.Dataset.from_dict({"page": pages})


def wikitext_detokenizer(doc):
    string = doc["page"]
    # contractions
    string = string.replace("s '", "s'")
    string = re.sub(r"/' [0-9]/", r"/'[0-9]/", string)
    # number separators
    string = string.replace(" @-@ ", "-")
    string = string.replace(" @,@ ", ",")
    string = string.replace(" @.@ ", ".")
    # punctuation
    string = string.replace(" : ", ": ")
    string = string.replace(" ; ", "; ")
    string = string.replace(" . ", ". ")
    string = string.replace(" ! ", "! ")
    string = string.replace(" ? ", "? ")
    string = string.replace(" , ", ", ")
    # double brackets
    string = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", string)
    string = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", string)
    string = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", string)
    string = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', string)
    string = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", string)
    # miscellaneous
    string = string.replace("= = = =", "====")
    string = string.replace("= = =", "===")
    string = string.replace("= =", "==")
    string = string.replace(" " + chr(176) + " ", chr(176))
    string = string.replace(" \n", "\n")
    string = string.replace("\n ", "\n")
    string = string.replace(" N ", " 1 ")
    string = string.replace(" 's", "'s")
    return string


def process_results(doc, results):
    (loglikelihood,) = results
    # word counts are taken on the text before detokenization, as lm-eval's wikitext does
    _words = len(re.split(r"\s+", doc["page"]))
    _bytes = len(doc["page"].encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, _words),
        "byte_perplexity": (loglikelihood, _bytes),
        "bits_per_byte": (loglikelihood, _bytes),
    }
