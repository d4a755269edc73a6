"""Fake `modules.ui_extra_networks` (host-contract §4.1–4.4): the page base class with the hosts' signatures,
its helpers, the page registry and an item → card HTML renderer that escapes exactly what the hosts escape
(name, description unless `extra_networks_card_description_is_html`, sort-key values, the default onclick) and
leaves raw what they leave raw (a custom `onclick`, search terms, the tree's label).
"""

from __future__ import annotations

import html
import json
import os
import urllib.parse
from pathlib import Path

from modules import shared, ui_extra_networks_user_metadata, util

extra_pages: list = []
allowed_dirs: set = set()
default_allowed_preview_extensions = ["png", "jpg", "jpeg", "webp", "gif"]

CARD_TEMPLATE = (
    '<div class="card" style="{style}" onclick="{card_clicked}" data-name="{name}" {sort_keys}>'
    "{background_image}"
    '<div class="button-row">{copy_path_button}{metadata_button}{edit_button}</div>'
    '<div class="actions"><div class="additional">{search_terms}</div>'
    '<span class="name">{name}</span><span class="description">{description}</span></div></div>'
)
TREE_FILE_TEMPLATE = (
    '<div class="tree-list-content tree-list-content-file" '
    "onclick=\"extraNetworksTreeOnClick(event, '{tabname}', '{extra_networks_tabname}');{onclick_extra}\" "
    'data-path="{data_path}" data-hash="{data_hash}">{label}</div>'
)


def _opt(key, default):
    return getattr(shared.opts, key, default)


def allowed_preview_extensions():
    return set(default_allowed_preview_extensions) | {_opt("samples_format", "png")}


def quote_js(s):
    """1.10.1 semantics: backslashes and double quotes escaped, newlines not."""
    s = s.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'


def register_page(page):
    extra_pages.append(page)
    allowed_dirs.clear()
    allowed_dirs.update(os.path.abspath(d) for p in extra_pages for d in p.allowed_directories_for_previews())


def initialize():
    extra_pages.clear()
    allowed_dirs.clear()


def path_is_parent(parent_path, child_path):
    parent_path = os.path.abspath(parent_path)
    child_path = os.path.abspath(child_path)
    return child_path.startswith(parent_path)


class ExtraNetworksPage:
    def __init__(self, title):
        self.title = title
        self.name = title.lower()
        self.extra_networks_tabname = self.name.replace(" ", "_")
        self.allow_prompt = True
        self.allow_negative_prompt = False
        self.metadata = {}
        self.items = {}
        self.lister = util.MassFileLister()
        self.card_tpl = CARD_TEMPLATE

    def refresh(self):
        pass

    def read_user_metadata(self, item, use_cache=True):
        from modules import extra_networks

        metadata = extra_networks.get_user_metadata(item.get("filename"), lister=self.lister if use_cache else None)
        if metadata.get("description") is not None:
            item["description"] = metadata["description"]
        if shared.FLAVOUR == "forge" and metadata.get("sd_version_str") is not None:
            item["sd_version_str"] = metadata["sd_version_str"]
        item["user_metadata"] = metadata

    def link_preview(self, filename):
        quoted = urllib.parse.quote(filename.replace("\\", "/"))
        mtime, _ = self.lister.mctime(filename)
        return f"./sd_extra_networks/thumb?filename={quoted}&mtime={mtime}"

    def search_terms_from_path(self, filename, possible_directories=None):
        abspath = os.path.abspath(filename)
        dirs = possible_directories if possible_directories is not None else self.allowed_directories_for_previews()
        for parent in dirs:
            parent = os.path.dirname(os.path.abspath(parent))
            if abspath.startswith(parent):
                return os.path.relpath(abspath, parent)
        return ""

    def create_item(self, name, index=None, enable_filter=True):
        raise NotImplementedError()

    def list_items(self):
        raise NotImplementedError()

    def allowed_directories_for_previews(self):
        return []

    def get_sort_keys(self, path):
        p = Path(path)
        mtime, ctime = self.lister.mctime(path)
        return {"date_created": int(mtime), "date_modified": int(ctime), "name": p.name.lower(), "path": str(p).lower()}

    def find_preview(self, path):
        for ext in sorted(allowed_preview_extensions()):
            for file in (f"{path}.{ext}", f"{path}.preview.{ext}"):
                if self.lister.exists(file):
                    return self.link_preview(file)
        return None

    def find_embedded_preview(self, path, name, metadata):
        file = f"{path}.safetensors"
        covers = metadata.get("ssmd_cover_images")
        if self.lister.exists(file) and covers and any(json.loads(covers)):
            return f"./sd_extra_networks/cover-images?page={self.extra_networks_tabname}&item={name}"
        return None

    def find_description(self, path):
        for file in (f"{path}.txt", f"{path}.description.txt"):
            if self.lister.exists(file):
                with open(file, encoding="utf-8", errors="replace") as f:
                    return f.read()
        return None

    def create_user_metadata_editor(self, ui, tabname):
        return ui_extra_networks_user_metadata.UserMetadataEditor(ui, tabname, self)

    # --- rendering (what create_html does with the items) ---------------------------------------------------

    def create_items(self):
        """What `create_html` does first: items by name, metadata, user metadata read where missing."""
        self.metadata = {}
        self.items = {x["name"]: x for x in self.list_items()}
        for item in self.items.values():
            if item.get("metadata"):
                self.metadata[item["name"]] = item["metadata"]
            if "user_metadata" not in item:
                self.read_user_metadata(item)
        return self.items

    def create_item_html(self, tabname, item, template=None):
        preview = item.get("preview")
        background = f'<img src="{html.escape(preview)}" class="preview" loading="lazy">' if preview else ""
        onclick = item.get("onclick")
        if onclick is None:
            onclick = html.escape(
                f"cardClicked('{tabname}', {item['prompt']}, {item.get('negative_prompt', chr(39) * 2)}, "
                f"{str(self.allow_negative_prompt).lower()});")
        elif shared.FLAVOUR == "forge":
            onclick = html.escape(f"selectVAE({item.get('vae', [])});") + onclick
        sort_keys = dict(item.get("sort_keys", {}))
        if shared.FLAVOUR == "forge":
            sort_keys["SDversion"] = item.get("sd_version_str", "SdVersion.Unknown")
        sort_html = " ".join(f'data-sort-{k}="{html.escape(str(v))}"' for k, v in sort_keys.items())
        terms = "".join(f"<span class='hidden search_terms'>{t}</span>" for t in item.get("search_terms", []))
        description = item.get("description") or "" if _opt("extra_networks_card_show_desc", True) else ""
        if not _opt("extra_networks_card_description_is_html", False):
            description = html.escape(description)
        args = {
            "background_image": background, "card_clicked": onclick, "copy_path_button": "",
            "metadata_button": "<div class='metadata-button'></div>" if item.get("metadata") else "",
            "edit_button": "", "description": description, "name": html.escape(item["name"]),
            "search_terms": terms, "sort_keys": sort_html, "style": "", "tabname": tabname,
            "extra_networks_tabname": self.extra_networks_tabname,
        }
        return template.format(**args) if template else args

    def create_tree_file_item_html(self, tabname, file_path, item):
        args = self.create_item_html(tabname, item)
        return TREE_FILE_TEMPLATE.format(tabname=tabname, extra_networks_tabname=self.extra_networks_tabname,
                                         onclick_extra=args["card_clicked"], data_path=file_path,
                                         data_hash=item["shorthash"], label=item["name"])
