-- luacheck: globals module prosody
-- policyplug_event.lib.lua, part of mod_policyplug (module:require "policyplug_event"): what a
-- stanza is in the terms of the rule language, and its event JSON. No state, no Prosody hooks.

local jid_util = require "util.jid";

local MAX_REQUEST = 1000000; -- the service refuses request lines over 1 MiB
local BODY_KEPT = 150000;    -- what is left of a body that would make the request too long (x6 escaped < 1 MiB)

-- The event JSON is written by hand: util.json is general and allocates a lot (and Prosody's
-- garbage collector is tuned to collect often, so allocations are what costs). Strings are valid
-- UTF-8 (Prosody's XML parser refuses anything else), so JSON only needs quotes, backslashes and
-- control characters escaped. Fields left out take their defaults (docs/cli.md): `time` is now,
-- `protocol` is xmpp (inferred from the addresses), `body`/`subject`/`type` are empty.
local escapes = { ['"'] = '\\"', ["\\"] = "\\\\", ["\n"] = "\\n", ["\r"] = "\\r", ["\t"] = "\\t" };
local function escape_char(c) return escapes[c] or ("\\u%04x"):format(c:byte()); end
local function quote(s)
	if not s:find('[%c"\\]') then return '"' .. s .. '"'; end
	return '"' .. s:gsub('[%c"\\]', escape_char) .. '"';
end

------------------------------------------------------------------------------------------------
-- Events: what a stanza is, in the terms of the rule language.
------------------------------------------------------------------------------------------------

local SUBSCRIPTION_TYPES = { subscribe = true, subscribed = true, unsubscribe = true, unsubscribed = true };

local function kind_of(stanza)
	local name, stype = stanza.name, stanza.attr.type;
	if name == "message" then
		return stype == "groupchat" and "groupchat" or "message";
	elseif name == "presence" then
		if SUBSCRIPTION_TYPES[stype] then return "subscribe"; end
		if stype == nil and stanza:get_child("x", "http://jabber.org/protocol/muc") then return "join"; end
		return "presence";
	elseif name == "iq" then
		if stype ~= "get" and stype ~= "set" then return nil; end -- answers are not decided
		local jingle = stanza:get_child("jingle", "urn:xmpp:jingle:1");
		if jingle then
			local content = jingle:get_child("content");
			local description = content and content:get_child("description");
			local ns = description and description.attr.xmlns or "";
			if ns:match("^urn:xmpp:jingle:apps:file%-transfer") then return "file"; end
			return "call";
		end
		if stanza:get_child("si", "http://jabber.org/protocol/si")
			or stanza:get_child("request", "urn:xmpp:http:upload:0") then
			return "file";
		end
		return "iq";
	end
end

-- The namespaces of the stanza's children, as a JSON list (first seen first, no repeats).
local function payload_json(stanza)
	local tags = stanza.tags;
	if #tags == 0 then return "[]"; end
	if #tags == 1 then -- the usual message: one <body/>, or one payload
		local ns = tags[1].attr.xmlns;
		return ns and "[" .. quote(ns) .. "]" or "[]";
	end
	local seen, list = {}, {};
	for i = 1, #tags do
		local ns = tags[i].attr.xmlns;
		if ns and not seen[ns] then seen[ns] = true; list[#list + 1] = quote(ns); end
	end
	return "[" .. table.concat(list, ",") .. "]";
end

------------------------------------------------------------------------------------------------
-- Content: everything the recipient can be shown (docs/semantics.md, "What body and subject are").
-- `body` is, in document order and joined by "\n": every <body> (every xml:lang), the text of an
-- XHTML-IM <html>, out-of-band URLs and descriptions, presence <status>, invitation reasons,
-- nicknames, reactions, data forms, error texts, file names and descriptions, and the same of
-- every forwarded message (XEP-0297: quoted,
-- carbons, archive results), at any depth up to MAX_DEPTH; `subject` is every <subject>.
-- What cannot be read (encrypted payloads, nesting deeper than MAX_DEPTH, more than MAX_ELEMENTS
-- elements, a body cut to fit the request) makes the content incomplete, and
-- policyplug_unreadable_content says what happens.
------------------------------------------------------------------------------------------------

local XHTML_IM, FORWARD, OOB = "http://jabber.org/protocol/xhtml-im", "urn:xmpp:forward:0", "jabber:x:oob";
local MUC_USER, CONFERENCE = "http://jabber.org/protocol/muc#user", "jabber:x:conference";
local ERROR_NS = "urn:ietf:params:xml:ns:xmpp-stanzas";
local FILE_NS = { ["urn:xmpp:file:metadata:0"] = true, ["urn:xmpp:jingle:apps:file-transfer:5"] = true,
	["urn:xmpp:jingle:apps:file-transfer:4"] = true, ["urn:xmpp:jingle:apps:file-transfer:3"] = true,
	["http://jabber.org/protocol/si/profile/file-transfer"] = true };
local ENCRYPTED = { -- element name .. " " .. namespace: payloads only the recipient's client can read
	["encrypted eu.siacs.conversations.axolotl"] = "OMEMO", ["encrypted urn:xmpp:omemo:1"] = "OMEMO",
	["encrypted urn:xmpp:omemo:2"] = "OMEMO", ["openpgp urn:xmpp:openpgp:0"] = "OpenPGP (XEP-0373)",
	["x jabber:x:encrypted"] = "OpenPGP (XEP-0027)", ["encryption urn:xmpp:eme:0"] = "an end-to-end encryption",
};
local NICK, REACTIONS, DATA_FORM = "http://jabber.org/protocol/nick", "urn:xmpp:reactions:0", "jabber:x:data";
-- how a client lays out a rich text: elements shown on lines of their own, attributes it shows
local XHTML_LAYOUT = { block = { p = true, div = true, br = true, li = true, blockquote = true, ul = true, ol = true,
	pre = true }, attrs = { "alt", "title" } };
local FORM_LAYOUT = { block = { title = true, instructions = true, field = true, value = true, item = true,
	reported = true }, attrs = { "label" } };
local MAX_DEPTH = 8;        -- forwarded inside forwarded (or wrappers) deeper than this is not read
local MAX_ELEMENTS = 5000;  -- elements walked per stanza (Prosody's own limits keep stanzas smaller)

local function is_client_ns(ns) return ns == nil or ns == "jabber:client" or ns == "jabber:server"; end
-- payloads that carry no text (most messages have some): not walked when empty
local TEXTLESS = { ["http://jabber.org/protocol/chatstates"] = true, ["urn:xmpp:receipts"] = true,
	["urn:xmpp:chat-markers:0"] = true, ["urn:xmpp:sid:0"] = true, ["urn:xmpp:hints"] = true,
	["urn:xmpp:delay"] = true, ["urn:xmpp:message-correct:0"] = true, ["urn:xmpp:fallback:0"] = true,
	["urn:xmpp:reply:0"] = true, ["urn:xmpp:styling:0"] = true };

-- Reads one stanza: c.bodies, c.subjects (lists of texts), c.unreadable (why, or nil).
local Content = {};
Content.__index = Content;

function Content:count()
	self.budget = self.budget - 1;
	if self.budget < 0 then self.unreadable = self.unreadable or "more than " .. MAX_ELEMENTS .. " elements"; end
	return self.budget >= 0;
end

-- Every text node under el, in document order; with a layout (XHTML-IM, data forms), line breaks
-- around blocks and the attributes a client shows (an image's alt text, a field's label).
function Content:text(el, out, layout)
	for i = 1, #el do
		local child = el[i];
		if type(child) == "string" then
			out[#out + 1] = child;
		elseif self:count() then
			local block = layout and layout.block[child.name];
			if block then out[#out + 1] = "\n"; end
			if layout then
				for _, attr in ipairs(layout.attrs) do
					if child.attr[attr] then out[#out + 1] = child.attr[attr]; end
				end
			end
			self:text(child, out, layout);
			if block then out[#out + 1] = "\n"; end
		end
	end
	return out;
end

function Content:add(el, layout)
	local text = table.concat(self:text(el, {}, layout));
	if text ~= "" then self.bodies[#self.bodies + 1] = text; end
end

-- A message (or presence, or the payload of an IQ), and what it forwards.
function Content:stanza(el, depth)
	local tags = el.tags;
	for i = 1, #tags do
		local child = tags[i];
		if not self:count() then return; end
		local name, ns = child.name, child.attr.xmlns;
		if TEXTLESS[ns] and #child == 0 then -- luacheck: ignore 542 (empty, as they are: nothing to read)
		elseif is_client_ns(ns) then
			if name == "body" or name == "status" then
				self:add(child);
				if name == "body" and (child:get_text() or ""):match("^%?OTR[:v,?]") then
					self.unreadable = self.unreadable or "OTR-encrypted body";
				end
			elseif name == "subject" then
				local text = table.concat(self:text(child, {}));
				if text ~= "" then self.subjects[#self.subjects + 1] = text; end
			elseif name == "error" then
				local text = child:get_child("text", ERROR_NS);
				if text then self:add(text); end
			end
		elseif name == "html" and ns == XHTML_IM then
			self:add(child, XHTML_LAYOUT);
		elseif name == "x" and ns == DATA_FORM then
			self:add(child, FORM_LAYOUT);
		elseif (name == "nick" and ns == NICK) or (name == "reactions" and ns == REACTIONS) then
			self:add(child); -- a sender's nickname, reactions: shown beside the message
		elseif name == "x" and ns == OOB then
			for _, part in ipairs({ "url", "desc" }) do
				local text = child:get_child(part);
				if text then self:add(text); end
			end
		elseif name == "x" and ns == CONFERENCE then
			if child.attr.reason and child.attr.reason ~= "" then self.bodies[#self.bodies + 1] = child.attr.reason; end
		elseif name == "x" and ns == MUC_USER then
			for _, what in ipairs(child.tags) do -- invite, decline: their reason is shown
				local reason = what:get_child("reason");
				if reason then self:add(reason); end
			end
		else
			self:payload(child, depth);
		end
	end
end

-- Any other element: look inside for what a client shows (forwarded messages, files) or cannot
-- be read (encrypted), down to MAX_DEPTH; a chain of forwarded messages deeper than that is unreadable.
function Content:payload(el, depth)
	local name, ns = el.name, el.attr.xmlns or "";
	local encrypted = ENCRYPTED[name .. " " .. ns];
	if encrypted then
		self.unreadable = self.unreadable or encrypted .. " content";
		return;
	end
	if name == "forwarded" and ns == FORWARD then
		if depth >= MAX_DEPTH then -- a chain of forwarded messages longer than is read
			self.unreadable = self.unreadable or "nested deeper than " .. MAX_DEPTH;
			return;
		end
		for _, inner in ipairs(el.tags) do
			if inner.name == "message" and self:count() then self:stanza(inner, depth + 1); end
		end
		return;
	end
	if name == "file" and FILE_NS[ns] then
		for _, part in ipairs({ "name", "desc" }) do
			local text = el:get_child(part);
			if text then self:add(text); end
		end
	end
	if depth >= MAX_DEPTH then return; end -- no client shows what is this deep in an unknown element
	for _, child in ipairs(el.tags) do
		if not self:count() then return; end
		self:payload(child, depth + 1);
	end
end

-- body text, subject text (or nil), why the content is incomplete (or nil)
local function content_of(stanza)
	local tags = stanza.tags;
	local only = #tags == 1 and tags[1];
	if only and only.name == "body" and is_client_ns(only.attr.xmlns) and #only.tags == 0 then
		-- the usual message: one plain body
		local text = only:get_text();
		if not text:match("^%?OTR[:v,?]") then return text; end
	end
	local c = setmetatable({ bodies = {}, subjects = {}, budget = MAX_ELEMENTS }, Content);
	c:stanza(stanza, 0);
	local body = #c.bodies > 0 and table.concat(c.bodies, "\n") or nil;
	local subject = #c.subjects > 0 and table.concat(c.subjects, "\n") or nil;
	return body, subject, c.unreadable;
end

-- The members every event JSON has (docs/cli.md), up to and with the client, for stanzas and
-- logins alike: the one place the module spells them (tests/test_schema.py holds them to the
-- schema). Left open for the content members; `time` is left out (the service's now is the same moment).
local function event_head(kind, from, to, stype, size, payload, session)
	local conn = session.conn;
	local port = conn and conn.clientport and tonumber(conn:clientport()) or 0;
	return '{"kind":"' .. kind .. '","from":' .. quote(from) .. ',"to":' .. quote(to)
		.. ',"protocol":"xmpp","type":' .. quote(stype) .. ',"size":' .. size
		.. ',"payload":' .. payload .. ',"client":{"ip":' .. quote(session.ip or "")
		.. ',"port":' .. port .. ',"secure":' .. (session.secure and "true" or "false") .. "}";
end

-- The event JSON of a stanza; body, subject and unreadable are content_of's.
local function event_json(origin, stanza, kind, body, subject, unreadable)
	local attr = stanza.attr;
	local from = attr.from or origin.full_jid or origin.host or "";
	local to = attr.to or jid_util.bare(from) or from; -- no 'to': addressed to the sender's own account
	local head = event_head(kind, from, to, attr.type or "", #tostring(stanza), payload_json(stanza), origin)
		.. (subject and ',"subject":' .. quote(subject) or "");
	if body then
		local body_json = quote(body);
		if #head + #body_json > MAX_REQUEST - 100 then
			-- only a pathological body (256 KiB of characters JSON escapes as \u00XX) gets here; the
			-- policy sees the start of it, and the true stanza size
			body_json = quote((body:sub(1, BODY_KEPT):gsub("[\128-\255]+$", "")));
			unreadable = unreadable or "body longer than the request allows";
		end
		head = head .. ',"body":' .. body_json;
	end
	if unreadable then head = head .. ',"content_complete":false'; end
	return head .. "}";
end

-- The event JSON of a login: a client session bound a resource (its full JID) on its host.
local function login_json(session)
	return event_head("login", session.full_jid, session.host, "bind", 0, "[]", session) .. "}";
end

return { quote = quote, kind_of = kind_of, content_of = content_of, event_json = event_json, login_json = login_json,
	SUBSCRIPTION_TYPES = SUBSCRIPTION_TYPES, is_client_ns = is_client_ns, XHTML_IM = XHTML_IM };
