"""Fake `modules.ui_extra_networks_user_metadata` (host-contract §4.5): the editor base class; the gradio-building
methods are no-ops, the data methods behave as the hosts' do (sidecar `<stem>.json`, indent 4, UTF-8)."""

from __future__ import annotations

import html
import json
import os


class UserMetadataEditor:
    def __init__(self, ui, tabname, page):
        self.ui = ui
        self.tabname = tabname
        self.page = page
        self.id_part = f"{tabname}_{page.extra_networks_tabname}_edit_user_metadata"
        self.box = self.edit_name_input = self.button_edit = None
        self.edit_name = self.edit_description = self.edit_notes = None
        self.html_filedata = self.html_preview = self.html_status = None
        self.button_cancel = self.button_replace_preview = self.button_save = None

    def get_user_metadata(self, name):
        item = self.page.items.get(name, {})
        user_metadata = item.get("user_metadata")
        if not user_metadata:
            user_metadata = {"description": item.get("description", "")}
            item["user_metadata"] = user_metadata
        return user_metadata

    def create_extra_default_items_in_left_column(self):
        pass

    def create_default_editor_elems(self):
        pass

    def create_default_buttons(self):
        pass

    def get_card_html(self, name):
        preview = self.page.items.get(name, {}).get("preview")
        img = f'<img src="{html.escape(preview)}" class="preview">' if preview else ""
        return f"<div class='card standalone-card-preview'>{img}</div>"

    def get_metadata_table(self, name):
        item = self.page.items.get(name, {})
        st = os.stat(item["filename"])
        return [("Filename: ", os.path.basename(item["filename"])), ("File size: ", str(st.st_size)),
                ("Hash: ", item.get("shorthash")), ("Modified: ", str(int(st.st_mtime)))]

    def put_values_into_components(self, name):
        user_metadata = self.get_user_metadata(name)
        rows = self.get_metadata_table(name)
        table = '<table class="file-metadata">' + "".join(
            f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows if v is not None) + "</table>"
        return html.escape(name), user_metadata.get("description", ""), table, self.get_card_html(name), \
            user_metadata.get("notes", "")

    def write_user_metadata(self, name, metadata):
        filename = self.page.items.get(name, {}).get("filename")
        basename, _ = os.path.splitext(filename)
        with open(basename + ".json", "w", encoding="utf8") as f:
            json.dump(metadata, f, indent=4, ensure_ascii=False)
        self.page.lister.update_file_entry(basename + ".json")

    def save_user_metadata(self, name, desc, notes):
        user_metadata = self.get_user_metadata(name)
        user_metadata["description"] = desc
        user_metadata["notes"] = notes
        self.write_user_metadata(name, user_metadata)

    def setup_save_handler(self, button, func, components):
        pass

    def create_editor(self):
        pass

    def create_ui(self):
        pass

    def setup_ui(self, gallery):
        pass
