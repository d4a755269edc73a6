"""Fake `modules.infotext_utils`: quote/unquote and a small parse_generation_parameters."""

import json
import re

re_param = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def quote(text):
    if "," not in str(text) and "\n" not in str(text) and ":" not in str(text):
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text):
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:
        return text


def create_infotext_line(params: dict) -> str:
    return ", ".join(k if k == v else f"{k}: {quote(v)}" for k, v in params.items() if v is not None)


def parse_generation_parameters(x: str):
    *lines, lastline = x.strip().split("\n")
    res = {"Prompt": "\n".join(lines).strip()}
    for k, v in re_param.findall(lastline):
        res[k.strip()] = unquote(v.strip())
    return res
