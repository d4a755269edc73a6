// sd-webui-adapters: the adapter cards' behaviour on the extra-networks page.
// A click toggles `<lora:name:unet[:te]>` (plus activation text) in the prompt; cards whose adapter is in the
// prompt carry `adapters-active`, kept in sync as the prompt is edited; small inputs on a card rewrite its tag.
// Everything shown from metadata goes through textContent, never innerHTML.
(function(root) {
    "use strict";

    var TAG = /<(lora|lyco):([^>]*)>/g;

    function fmt(x) {
        // the shortest decimal text, as lib_adapters.cards.format_strength
        var t = Number(Number(x).toFixed(4)).toString();
        return t === "-0" ? "0" : t;
    }

    function tagText(name, unet, te, order) {
        if (Number(unet) === Number(te)) return "<lora:" + name + ":" + fmt(unet) + ">";
        var first = order === "te,unet" ? te : unet;
        var second = order === "te,unet" ? unet : te;
        return "<lora:" + name + ":" + fmt(first) + ":" + fmt(second) + ">";
    }

    function parseTagBody(body, order, dflt) {
        // name and strengths as lib_adapters.tags reads them: positional numbers, then named unet= / te=
        var parts = body.split(":");
        var positional = [], named = {};
        parts.slice(1).forEach(function(item) {
            item = item.trim();
            var eq = item.indexOf("=");
            if (eq >= 0) {
                var key = item.slice(0, eq).trim();
                if (key === "unet" || key === "te") named[key] = parseFloat(item.slice(eq + 1));
            } else if (item) {
                positional.push(parseFloat(item));
            }
        });
        var unet = dflt, te = dflt;
        if (positional.length === 1) {
            unet = te = positional[0];
        } else if (positional.length >= 2) {
            unet = order === "te,unet" ? positional[1] : positional[0];
            te = order === "te,unet" ? positional[0] : positional[1];
        }
        if ("unet" in named) unet = named.unet;
        if ("te" in named) te = named.te;
        return {name: parts[0].trim(), unet: unet, te: te};
    }

    function findTags(text, order, dflt) {
        var out = [], m;
        TAG.lastIndex = 0;
        while ((m = TAG.exec(text)) !== null) {
            var parsed = parseTagBody(m[2], order, dflt === undefined ? 1 : dflt);
            parsed.start = m.index;
            parsed.end = m.index + m[0].length;
            out.push(parsed);
        }
        return out;
    }

    function sameName(a, b) {
        return a.toLowerCase() === b.toLowerCase();
    }

    function hasTag(text, name) {
        return findTags(text).some(function(t) {
            return sameName(t.name, name);
        });
    }

    function removeTag(text, name, activation, sep) {
        // every tag of `name`, the activation text right after it and the separator before it
        sep = sep === undefined ? " " : sep;
        var tags = findTags(text).filter(function(t) {
            return sameName(t.name, name);
        });
        for (var i = tags.length - 1; i >= 0; i--) {
            var start = tags[i].start, end = tags[i].end;
            if (activation) {
                var after = text.slice(end);
                var lead = after.match(/^\s*/)[0];
                if (after.slice(lead.length, lead.length + activation.length) === activation) {
                    end += lead.length + activation.length;
                }
            }
            if (sep && text.slice(start - sep.length, start) === sep) {
                start -= sep.length;
            } else if (start === 0 && sep && text.slice(end, end + sep.length) === sep) {
                end += sep.length;
            }
            text = text.slice(0, start) + text.slice(end);
        }
        return text;
    }

    function addText(text, added, sep) {
        sep = sep === undefined ? " " : sep;
        if (!text.trim()) return added;
        return text + sep + added;
    }

    function toggle(text, payload, unet, te, sep) {
        // remove the adapter's tag when present, else add it with the given strengths
        if (hasTag(text, payload.name)) return removeTag(text, payload.name, payload.activation, sep);
        var added = tagText(payload.name, unet, te, payload.order);
        if (payload.activation) added += " " + payload.activation;
        return addText(text, added, sep);
    }

    function setStrengths(text, name, unet, te, order) {
        // rewrite every tag of `name` with new strengths
        var tags = findTags(text);
        for (var i = tags.length - 1; i >= 0; i--) {
            if (!sameName(tags[i].name, name)) continue;
            text = text.slice(0, tags[i].start) + tagText(tags[i].name, unet, te, order) + text.slice(tags[i].end);
        }
        return text;
    }

    function toggleNegative(text, negative, adding, sep) {
        if (!negative) return text;
        var present = text.indexOf(negative) >= 0;
        if (adding && !present) return addText(text, negative, sep);
        if (!adding && present) {
            var i = text.indexOf(negative);
            var start = i, end = i + negative.length;
            if (sep && text.slice(start - sep.length, start) === sep) start -= sep.length;
            return text.slice(0, start) + text.slice(end);
        }
        return text;
    }

    var api = {
        fmt: fmt, tagText: tagText, parseTagBody: parseTagBody, findTags: findTags, hasTag: hasTag,
        removeTag: removeTag, toggle: toggle, setStrengths: setStrengths, toggleNegative: toggleNegative,
    };

    if (typeof module !== "undefined" && module.exports) {
        module.exports = api;
    }
    if (typeof document === "undefined") return;

    // ---- DOM side -------------------------------------------------------------------------------------------

    function app() {
        return typeof gradioApp === "function" ? gradioApp() : document;
    }

    function option(key, dflt) {
        return typeof opts === "object" && opts && opts[key] !== undefined ? opts[key] : dflt;
    }

    function payloadOf(card) {
        if (card.__adapters) return card.__adapters;
        try {
            card.__adapters = JSON.parse(card.dataset.sortAdapter);
        } catch (e) {
            card.__adapters = null;
        }
        return card.__adapters;
    }

    function tabOf(el) {
        for (var n = el; n && n !== document; n = n.parentNode) {
            var m = n.id && n.id.match(/^(txt2img|img2img)_/);
            if (m) return m[1];
        }
        return "txt2img";
    }

    function promptArea(tab, negative) {
        return app().querySelector("#" + tab + (negative ? "_neg_prompt" : "_prompt") + " textarea");
    }

    function cardsOf(tab) {
        var scope = app().querySelector("#" + tab + "_extra_tabs") || app();
        return Array.prototype.filter.call(scope.querySelectorAll(".card[data-sort-adapter]"), function(c) {
            return tabOf(c) === tab;
        });
    }

    function cardFor(el, name) {
        if (el && el.classList && el.classList.contains("card") && el.dataset.sortAdapter) return el;
        var tab = tabOf(el);
        return cardsOf(tab).find(function(c) {
            return c.dataset.name === name;
        }) || null;
    }

    function setArea(area, text) {
        area.value = text;
        if (typeof updateInput === "function") {
            updateInput(area);
        } else {
            area.dispatchEvent(new Event("input", {bubbles: true}));
        }
    }

    function strengthsOf(card, payload) {
        var inputs = card.querySelectorAll(".adapters-strengths input");
        if (inputs.length === 2) {
            var u = parseFloat(inputs[0].value), t = parseFloat(inputs[1].value);
            return [isNaN(u) ? payload.unet : u, isNaN(t) ? payload.te : t];
        }
        return [payload.unet, payload.te];
    }

    function cardClicked(event, el, name) {
        var card = cardFor(el, name);
        if (!card) return false;
        var payload = payloadOf(card);
        if (!payload || payload.error) return false;  // a file that cannot be used: its card says why
        var tab = tabOf(card);
        var area = promptArea(tab, false);
        if (!area) return false;
        var sep = option("extra_networks_add_text_separator", " ");
        var s = strengthsOf(card, payload);
        var adding = !hasTag(area.value, payload.name);
        setArea(area, toggle(area.value, payload, s[0], s[1], sep));
        var neg = promptArea(tab, true);
        if (neg && payload.negative) setArea(neg, toggleNegative(neg.value, payload.negative, adding, sep));
        syncTab(tab);
        if (event && event.stopPropagation) event.stopPropagation();
        return false;
    }

    function strengthChanged(card) {
        var payload = payloadOf(card);
        var tab = tabOf(card);
        var area = promptArea(tab, false);
        if (!payload || !area || !hasTag(area.value, payload.name)) return;
        var s = strengthsOf(card, payload);
        setArea(area, setStrengths(area.value, payload.name, s[0], s[1], payload.order));
    }

    function span(cls, text, title) {
        var el = document.createElement("span");
        el.className = cls;
        el.textContent = text;
        if (title) el.title = title;
        return el;
    }

    function strengthInput(value, label, card) {
        var input = document.createElement("input");
        input.type = "number";
        input.step = "0.05";
        input.value = fmt(value);
        input.title = label;
        input.setAttribute("aria-label", label);
        ["click", "mousedown", "keydown"].forEach(function(type) {
            input.addEventListener(type, function(e) {
                e.stopPropagation();
            });
        });
        input.addEventListener("input", function() {
            strengthChanged(card);
        });
        return input;
    }

    function decorate(card) {
        if (card.classList.contains("adapters-card")) return;
        var payload = payloadOf(card);
        if (!payload) return;
        card.classList.add("adapters-card");
        if (payload.mismatch) card.classList.add("adapters-mismatch");
        var badges = document.createElement("div");
        badges.className = "adapters-badges";
        if (payload.error) {
            card.classList.add("adapters-error");
            badges.appendChild(span("adapters-badge adapters-error-badge", "cannot be used", payload.error));
            card.appendChild(badges);
            return;
        }
        badges.appendChild(span("adapters-badge adapters-type", payload.type, "adapter type"));
        badges.appendChild(span("adapters-badge adapters-family" + (payload.mismatch ? " adapters-family-other" : ""),
            payload.family, payload.mismatch ? "made for another model family than the loaded model" : "base model family"));
        if (payload.rank) {
            var block = /^block/.test(payload.rank_label || "");
            badges.appendChild(span("adapters-badge adapters-rank", (block ? "b" : "r") + payload.rank,
                payload.rank_label || "rank " + payload.rank));
        }
        var box = document.createElement("div");
        box.className = "adapters-strengths";
        box.appendChild(span("adapters-label", "U"));
        box.appendChild(strengthInput(payload.unet, "UNet strength", card));
        box.appendChild(span("adapters-label", "TE"));
        box.appendChild(strengthInput(payload.te, "Text-encoder strength", card));
        box.addEventListener("click", function(e) {
            e.stopPropagation();
        });
        card.appendChild(badges);
        var actions = card.querySelector(".actions") || card;
        actions.insertBefore(box, actions.firstChild);
    }

    function syncTab(tab) {
        var area = promptArea(tab, false);
        var text = area ? area.value : "";
        var byOrder = {};  // two numbers are read in the tag order the card carries (setting "unet,te" / "te,unet")
        cardsOf(tab).forEach(function(card) {
            var payload = payloadOf(card);
            if (!payload) return;
            decorate(card);
            var order = payload.order || "unet,te";
            var tags = byOrder[order] || (byOrder[order] = findTags(text, order, 1));
            var found = null;
            tags.forEach(function(t) {
                if (sameName(t.name, payload.name)) found = t;
            });
            card.classList.toggle("adapters-active", !!found);
            if (found) {
                var inputs = card.querySelectorAll(".adapters-strengths input");
                if (inputs.length === 2) {
                    var focused = document.activeElement;
                    if (inputs[0] !== focused && !isNaN(found.unet)) inputs[0].value = fmt(found.unet);
                    if (inputs[1] !== focused && !isNaN(found.te)) inputs[1].value = fmt(found.te);
                }
            }
        });
        addSortButtons(tab);
    }

    var SORTS = [["type", "Type"], ["family", "Family"], ["rank", "Rank"]];

    function addSortButtons(tab) {
        var card = cardsOf(tab)[0];
        var holder = card && card.closest("[id$='_cards']");
        if (!holder) return;
        var base = holder.id.replace(/_cards$/, "");
        var controls = app().querySelector("#" + base + "_controls");
        var proto = app().querySelector("#" + base + "_extra_sort_name");
        if (!controls || !proto || controls.querySelector(".adapters-sort")) return;
        var sorts = controls.querySelectorAll(".extra-network-control--sort");
        var after = sorts[sorts.length - 1];
        SORTS.forEach(function(s) {
            var btn = proto.cloneNode(true);
            btn.id = base + "_extra_sort_adapters_" + s[0];
            btn.dataset.sortkey = s[0];
            btn.title = "Sort by " + s[1].toLowerCase();
            btn.classList.remove("extra-network-control--enabled");
            btn.classList.add("adapters-sort");
            btn.textContent = s[1];
            after.parentNode.insertBefore(btn, after.nextSibling);
            after = btn;
        });
    }

    var timer = null;

    function syncAll() {
        timer = null;
        ["txt2img", "img2img"].forEach(syncTab);
    }

    function schedule() {
        if (timer === null) timer = setTimeout(syncAll, 50);
    }

    document.addEventListener("input", function(e) {
        var t = e.target;
        if (t && t.tagName === "TEXTAREA" && t.closest && t.closest("[id$='_prompt']")) syncTab(tabOf(t));
    }, true);

    if (typeof onUiUpdate === "function") {
        onUiUpdate(schedule);
    } else if (typeof MutationObserver === "function") {
        document.addEventListener("DOMContentLoaded", function() {
            new MutationObserver(schedule).observe(document.body, {childList: true, subtree: true});
            schedule();
        });
    }

    root.adaptersCardClicked = cardClicked;
    root.sdAdapters = api;
    api.syncAll = syncAll;
})(typeof window !== "undefined" ? window : this);
