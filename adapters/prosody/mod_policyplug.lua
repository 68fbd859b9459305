-- luacheck: globals module prosody
-- mod_policyplug: every message, presence, subscription, IQ, group chat message, room join and
-- login is decided by the policyplug decision service, and the decision is enforced here.
--
-- How a stanza travels:
--   1. A stanza from a local client (pre-message/*, pre-presence/*, pre-iq/* on the sender's host)
--      or from a remote server (message/*, presence/*, iq/* with an s2sin origin) is taken out of
--      Prosody's processing (the hook returns true) and put in its session's queue.
--   2. The event JSON goes to the decision service: over its Unix socket (policyplug_socket,
--      newline-delimited JSON, pipelined) or as an IQ to its XEP-0114 component (policyplug_component).
--      Nothing waits: the session goes on reading, so one sender can have many decisions in flight.
--   3. When the answer arrives (or the timeout passes, or the service disconnects) the entry is
--      settled; the session's queue is delivered in order, so a sender's stanzas never overtake
--      each other. Allowed stanzas are posted again with a mark that lets them pass this module,
--      so every other module (carbons, MAM, ...) sees them once, as usual.
-- Logins (resource bind) wait for their decision inside the session's async runner instead:
-- nothing of a session is processed before its login is decided.
-- Stanzas this module sends itself (bounces, refusals, archive copies) are never decided.
--
-- Options (Prosody config, per host or global):
--   policyplug_socket = "/run/policyplug/policyplug.sock" -- the service's Unix socket (preferred)
--   policyplug_component = "policy.example.com"   -- or its component JID (default policy.<host>)
--   policyplug_timeout = 2                         -- seconds to wait for a decision
--   policyplug_fail_mode = "closed"                -- "closed": refuse when no answer; "open": deliver
--   policyplug_kinds = { "message", "presence", ... }  -- event kinds to check (default: all)
--   policyplug_cache = true                        -- cache decisions per (kind, from, to) when the
--                                                  -- service says the policy allows it (socket only)
--   policyplug_unreadable_content = "refuse"       -- content the module cannot read in full (encrypted,
--                                                  -- too deep, too large): "refuse" it, or "decide" on
--                                                  -- what was read, with "content_complete": false
--   policyplug_copy_body = "text"                  -- archive copies: "text" shows the original text in
--                                                  -- the body and forwards the original; "forwarded":
--                                                  -- only in <forwarded/>; "summary": no text at all

local st = require "util.stanza";
local jid_util = require "util.jid";
local json = require "util.json";
local async = require "util.async";
local datetime = require "util.datetime";
local time_now = require "util.time".now;
local new_id = require "util.id".short;

local NS = "urn:policyplug:decision:1";
local ALLOW, DROP = { decision = "allow" }, { decision = "drop" }; -- shared, never modified
local socket_path = module:get_option_string("policyplug_socket");
local service_jid = module:get_option_string("policyplug_component", "policy." .. module.host);
local timeout = module:get_option_number("policyplug_timeout", 2);
local fail_mode = module:get_option_string("policyplug_fail_mode", "closed");
local kinds = module:get_option_set("policyplug_kinds", {
	"message", "groupchat", "presence", "subscribe", "join", "call", "file", "login", "iq" });
local use_cache = module:get_option_boolean("policyplug_cache", true);
local unreadable_mode = module:get_option_string("policyplug_unreadable_content", "refuse");
local copy_body = module:get_option_string("policyplug_copy_body", "text");
local UNAVAILABLE_REASON = "policy service unavailable";
local MAX_REQUEST = 1000000; -- the service refuses request lines over 1 MiB
local BODY_KEPT = 150000;    -- what is left of a body that would make the request too long (x6 escaped < 1 MiB)

if fail_mode ~= "open" and fail_mode ~= "closed" then
	module:log("error", "policyplug_fail_mode must be \"closed\" or \"open\", not %q: using \"closed\"", fail_mode);
	fail_mode = "closed";
end
if unreadable_mode ~= "refuse" and unreadable_mode ~= "decide" then
	module:log("error", "policyplug_unreadable_content must be \"refuse\" or \"decide\", not %q: using \"refuse\"",
		unreadable_mode);
	unreadable_mode = "refuse";
end
if copy_body ~= "text" and copy_body ~= "forwarded" and copy_body ~= "summary" then
	module:log("error", "policyplug_copy_body must be \"text\", \"forwarded\" or \"summary\", not %q: using \"text\"",
		copy_body);
	copy_body = "text";
end

local counters = { asked = 0, answered = 0, timeouts = 0, disconnected = 0, service_errors = 0,
	failed_closed = 0, failed_open = 0, lua_errors = 0 };
local outcome_metric = module:metric("counter", "outcomes", "",
	"policyplug decisions enforced, and failures handled by the fail mode", { "outcome" });
local metric_of = {};
local function count(name)
	counters[name] = (counters[name] or 0) + 1;
	local metric = metric_of[name];
	if not metric then metric = outcome_metric:with_labels(name); metric_of[name] = metric; end
	metric:add(1);
end
module.counters = counters; -- for `prosodyctl shell` and tests

local function value(x) -- JSON null -> nil
	if x == json.null then return nil; end
	return x;
end

------------------------------------------------------------------------------------------------
-- Transport: ask(request_json, waiter) settles the waiter exactly once, with a decision or with
-- nil and why. A waiter is a queue entry (see check) or, for logins, a function.
------------------------------------------------------------------------------------------------

local pending = {};               -- request id -> waiter
-- Prosody is stopping: sessions close and send their last presences. The transport stays up until
-- "server-cleanup" (after the sessions have closed), so those are decided as usual; what cannot be
-- decided meanwhile is handled by the fail mode and logged once, not once per stanza.
local stopping, undecided_while_stopping = false, 0;
local drained; -- while Prosody waits for the last decisions: called when none is pending
local close_transport;            -- transport-specific, at "server-cleanup"
module:hook_global("server-stopping", function () stopping = true; end, 1000);
-- "server-cleanup" comes after mod_c2s has closed the sessions, in Prosody's main runner: wait
-- (at most the timeout) for the decisions of their last stanzas, so they are enforced, not failed
module:hook_global("server-cleanup", function ()
	if next(pending) ~= nil and async.ready() then
		local wait, done = async.waiter(1, true);
		drained = done;
		module:add_timer(timeout, done);
		wait();
		drained = nil;
	end
	if close_transport then close_transport(); end
end);

-- The decision cache (socket transport only): decisions per (kind, from, to), used only while the
-- service says the policy in force reads nothing else (`cacheable`, from the `watch` op and every
-- reload notice), and only decisions of that policy revision that need no audit record. A reload
-- notice, a disconnection or a full cache empties it.
local MAX_CACHED = 10000;
local cache, cached_count = {}, 0;
local cache_revision;             -- the revision the cached decisions belong to; nil: no caching
local fresh_marker;               -- '"policy_revision":"<revision>"', found in answers of that revision
local function reset_cache(revision, cacheable)
	cache, cached_count = {}, 0;
	if use_cache and cacheable and type(revision) == "string" then
		cache_revision, fresh_marker = revision, '"policy_revision":"' .. revision .. '"';
	else
		cache_revision, fresh_marker = nil, nil;
	end
end
local function remember(key, decision)
	if cached_count >= MAX_CACHED then cache, cached_count = {}, 0; end
	cache[key] = decision;
	cached_count = cached_count + 1;
end
local deadline_ids, deadline_at, d_first, d_last = {}, {}, 1, 0; -- FIFO: deadlines grow with send order
local last_id = 0;
local send_request;               -- transport-specific: send_request(id, event_json) -> ok, err
local flush;                      -- delivers a session's settled entries (defined with the queues)

local function settle(id, decision, err, fresh)
	local waiter = pending[id];
	if not waiter then return; end -- already settled (a late answer after a timeout)
	pending[id] = nil;
	if drained and next(pending) == nil then drained(); end
	if fresh and cache_revision and type(waiter) == "table" and waiter.key then
		remember(waiter.key, decision);
	end
	local ok, lua_err;
	if type(waiter) == "function" then
		ok, lua_err = pcall(waiter, decision, err);
	else
		waiter.decision, waiter.why, waiter.done = decision, err, true;
		ok, lua_err = pcall(flush, waiter.origin);
	end
	if not ok then
		count("lua_errors");
		module:log("error", "policyplug: settling a decision failed: %s", lua_err);
	end
end

local function fail_all(why)
	local ids = {};
	for id in pairs(pending) do ids[#ids + 1] = id; end
	table.sort(ids); -- in sending order, as answers would have come
	for _, id in ipairs(ids) do settle(id, nil, why); end
end

-- One timer for all requests: answers that do not come within the timeout settle as failures.
local SWEEP = math.min(0.1, timeout / 4);
local function sweep()
	local now = time_now();
	while d_first <= d_last and deadline_at[d_first] <= now do
		local id = deadline_ids[d_first];
		deadline_ids[d_first], deadline_at[d_first] = nil, nil;
		d_first = d_first + 1;
		if pending[id] then
			count("timeouts");
			settle(id, nil, ("no answer within %gs"):format(timeout));
		end
	end
end
module:add_timer(SWEEP, function ()
	local ok, err = pcall(sweep); -- an error must not stop the timer: it is what unblocks sessions
	if not ok then module:log("error", "policyplug timeout sweep failed: %s", err); end
	return SWEEP;
end);

-- The event JSON is written by hand: util.json is general and allocates a lot (and Prosody's
-- garbage collector is tuned to collect often, so allocations are what costs). Strings are valid
-- UTF-8 (Prosody's XML parser refuses anything else), so JSON only needs quotes, backslashes and
-- control characters escaped. Fields left out take the spec's defaults: `time` is now,
-- `protocol` is xmpp (inferred from the addresses), `body`/`subject`/`type` are empty.
local escapes = { ['"'] = '\\"', ["\\"] = "\\\\", ["\n"] = "\\n", ["\r"] = "\\r", ["\t"] = "\\t" };
local function escape_char(c) return escapes[c] or ("\\u%04x"):format(c:byte()); end
local function quote(s)
	if not s:find('[%c"\\]') then return '"' .. s .. '"'; end
	return '"' .. s:gsub('[%c"\\]', escape_char) .. '"';
end

local function ask(request_json, waiter)
	last_id = last_id + 1;
	local id = last_id;
	count("asked");
	-- pending before sending: an answer can come back within send_request (Prosody bounces an IQ
	-- to a component that is not connected at once)
	pending[id] = waiter;
	local ok, err = send_request(id, request_json);
	if not ok then
		settle(id, nil, err);
		return;
	end
	d_last = d_last + 1;
	deadline_ids[d_last], deadline_at[d_last] = id, time_now() + timeout;
end

-- Most answers are a plain allow (or drop) with no obligations. Those are recognised with a few
-- plain-text searches in [first, last] of `text` instead of util.json: inside JSON strings quotes
-- are escaped, so `"copy_to":[]` can only be the key itself. Anything else is decoded in full.
local NO_OBLIGATIONS = { '"copy_to":[]', '"disclaimers":[]', '"redirect_to":null', '"route_via":null',
	'"audit":false' };
local function quick_decision(text, first, last)
	local at, _, verdict = text:find('"decision":"(%a+)"', first);
	if not at or at > last or (verdict ~= "allow" and verdict ~= "drop") then return; end
	for i = 1, #NO_OBLIGATIONS do
		local found = text:find(NO_OBLIGATIONS[i], first, true);
		if not found or found > last then return; end
	end
	return verdict == "allow" and ALLOW or DROP;
end

local function handle_answer(id, answer)
	if type(answer) ~= "table" then
		settle(id, nil, "malformed answer from the decision service");
	elseif type(answer.decision) == "table" and type(answer.decision.decision) == "string" then
		count("answered");
		local decision = answer.decision;
		-- cached only if made by the policy the cache belongs to, and not to be audited
		settle(id, decision, nil, cache_revision ~= nil and decision.policy_revision == cache_revision
			and decision.audit == false);
	else
		count("service_errors");
		settle(id, nil, "decision service: " .. tostring(value(answer.error) or "malformed answer"));
	end
end

if socket_path then
	-- The local socket: newline-delimited JSON, answers matched on id (they may come out of order).
	local server = require "net.server";
	local have_unix, unix = pcall(require, "socket.unix");
	if have_unix and type(unix) == "function" then unix = { stream = unix }; end -- older LuaSocket
	local conn, buffer, reconnect_timer = nil, "", nil;
	local connect;

	local listeners = {};
	local function answer_line(data, start, newline)
		local _, head_end, id = data:find('^{"id":(%d+),"decision":{', start);
		id = tonumber(id);
		local quick = id and pending[id] and quick_decision(data, head_end, newline);
		if quick then
			count("answered");
			local at = fresh_marker and data:find(fresh_marker, head_end, true);
			settle(id, quick, nil, at and at < newline);
			return;
		end
		local line = data:sub(start, newline - 1);
		local ok, answer = pcall(json.decode, line);
		id = ok and type(answer) == "table" and value(answer.id);
		if id ~= nil and pending[id] then
			handle_answer(id, answer);
		elseif ok and type(answer) == "table" and (type(answer.reloaded) == "table" or type(answer.watch) == "table") then
			-- the policy in force (the `watch` op's answer, or a reload): cached decisions go
			local policy = answer.reloaded or answer.watch;
			reset_cache(value(policy.revision), policy.cacheable == true);
			module:log("info", "decision service policy %s%s", tostring(value(policy.revision)),
				cache_revision and ", decisions cached per (kind, from, to)" or ", not cached");
		elseif not (ok and type(answer) == "table") then
			count("service_errors");
			module:log("warn", "unreadable line from the decision service: %s", line:sub(1, 200));
		else -- e.g. a late answer to a request that has timed out meanwhile
			module:log("debug", "answer to no pending request: %s", line:sub(1, 200));
		end
	end

	function listeners.onincoming(_, data)
		if buffer ~= "" then data = buffer .. data; end
		local start = 1;
		while true do
			local newline = data:find("\n", start, true);
			if not newline then break; end
			local ok, err = pcall(answer_line, data, start, newline);
			if not ok then -- one bad line must not lose the answers after it
				count("lua_errors");
				module:log("error", "policyplug: reading an answer failed: %s", err);
			end
			start = newline + 1;
		end
		buffer = start <= #data and data:sub(start) or "";
	end
	function listeners.ondisconnect(_, err)
		conn, buffer = nil, "";
		reset_cache(nil, false); -- until the next connection says which policy is in force
		count("disconnected");
		if stopping then
			module:log("debug", "decision service socket %s closed (%s) while Prosody stops", socket_path, tostring(err));
			fail_all("Prosody is stopping");
			return;
		end
		module:log("warn", "decision service socket %s closed (%s); reconnecting", socket_path, tostring(err));
		fail_all("decision service disconnected");
		if not reconnect_timer then
			reconnect_timer = module:add_timer(1, function () reconnect_timer = nil; connect(); end);
		end
	end

	function connect()
		if conn then return true; end
		if not have_unix then return nil, "LuaSocket has no Unix socket support (socket.unix)"; end
		local sock = unix.stream();
		sock:settimeout(0);
		local ok, err = sock:connect(socket_path);
		if not ok then
			sock:close();
			if not reconnect_timer and not stopping then
				reconnect_timer = module:add_timer(1, function () reconnect_timer = nil; connect(); end);
			end
			return nil, err;
		end
		conn = server.wrapclient(sock, socket_path, 0, listeners, "*a");
		module:log("info", "connected to the decision service at %s", socket_path);
		-- which policy is in force, may its decisions be cached, and tell us of every reload
		conn:write('{"id":"watch","op":"watch"}\n');
		return true;
	end

	function send_request(id, event_json)
		if not conn then
			local ok, err = connect();
			if not ok then return nil, "decision service socket " .. socket_path .. ": " .. tostring(err); end
		end
		conn:write('{"id":' .. id .. ',"event":' .. event_json .. '}\n');
		return true;
	end

	function close_transport() -- after the sessions have closed (and their last stanzas were decided)
		fail_all("Prosody is stopping");
		if conn then conn:close(); end
	end
	function module.unload() stopping = true; if conn then conn:close(); end end
	connect();
	module:log("info", "asking the decision service at %s, timeout %ss, fail mode %s", socket_path, timeout, fail_mode);
else
	-- The XEP-0114 component: one IQ per decision, answered to this host.
	function send_request(id, event_json)
		module:send(st.iq({ type = "get", from = module.host, to = service_jid, id = "policyplug-" .. id })
			:text_tag("decide", event_json, { xmlns = NS }));
		return true;
	end

	local UNREACHABLE = { ["remote-server-timeout"] = true, ["service-unavailable"] = true,
		["remote-server-not-found"] = true, ["recipient-unavailable"] = true };
	local function on_answer(event)
		local stanza = event.stanza;
		if stanza.attr.from ~= service_jid then return; end
		local id = tonumber((stanza.attr.id or ""):match("^policyplug%-(%d+)$"));
		if not id or not pending[id] then return; end
		if stanza.attr.type == "result" then
			local element = stanza:get_child("decision", NS);
			local text = element and element:get_text() or "";
			local decision = quick_decision(text, 1, #text);
			if not decision then
				local ok, decoded = pcall(json.decode, text);
				decision = ok and decoded or nil;
			end
			handle_answer(id, { decision = decision });
		else
			local _, condition, text = stanza:get_error();
			if UNREACHABLE[condition] then -- Prosody's: the component is not connected, or unknown
				count("disconnected");
				settle(id, nil, "decision service not connected: " .. tostring(text or condition));
			else -- the service's (bad-request: an event it cannot decide)
				handle_answer(id, { error = text or condition });
			end
		end
		return true;
	end
	module:hook("iq/host", function (event)
		local type_ = event.stanza.attr.type;
		if type_ == "result" or type_ == "error" then return on_answer(event); end
	end, 100);
	module:log("info", "asking the decision service %s, timeout %ss, fail mode %s", service_jid, timeout, fail_mode);
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
module.content_of = content_of; -- for tests (tests/prosody_content_harness.lua)

-- The event JSON of a stanza (cli.md), without `time` (the service's now is the same moment);
-- body, subject and unreadable are content_of's.
local function event_json(origin, stanza, kind, body, subject, unreadable)
	local attr = stanza.attr;
	local from = attr.from or origin.full_jid or origin.host or "";
	local to = attr.to or jid_util.bare(from) or from; -- no 'to': addressed to the sender's own account
	local conn = origin.conn;
	local port = conn and conn.clientport and tonumber(conn:clientport()) or 0;
	local head = '{"kind":"' .. kind .. '","from":' .. quote(from) .. ',"to":' .. quote(to)
		.. ',"protocol":"xmpp","type":' .. quote(attr.type or "") .. ',"size":' .. #tostring(stanza)
		.. ',"payload":' .. payload_json(stanza) .. ',"client":{"ip":' .. quote(origin.ip or "")
		.. ',"port":' .. port .. ',"secure":' .. (origin.secure and "true" or "false") .. "}"
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

------------------------------------------------------------------------------------------------
-- Enforcement
------------------------------------------------------------------------------------------------

local passed = setmetatable({}, { __mode = "k" }); -- stanzas decided already, posted again

local function reply_to(origin, reply)
	if origin.type == "c2s" then
		if not reply.attr.to then reply.attr.to = origin.full_jid; end
		origin.send(reply);
	else
		module:send(reply);
	end
end

local function refuse(origin, stanza, reason)
	local stype = stanza.attr.type;
	if stype == "error" or stype == "result" then return; end -- never answer an error or a result
	if stanza.name == "presence" and SUBSCRIPTION_TYPES[stype] then
		if stype == "subscribe" and stanza.attr.to then
			-- the matching refusal of a subscription request
			reply_to(origin, st.presence({ type = "unsubscribed", from = jid_util.bare(stanza.attr.to),
				to = jid_util.bare(stanza.attr.from or origin.full_jid), id = stanza.attr.id })
				:text_tag("status", reason));
		end
		return;
	end
	reply_to(origin, st.error_reply(stanza, "modify", "policy-violation", reason));
end

local function archive_copy(origin, stanza, address)
	-- the visible body says what this is and, unless the operator keeps texts out of copies, what
	-- was written (plain clients show only the body); the original follows in XEP-0297 <forwarded/>
	local original;
	if copy_body == "summary" then
		local attr = {};
		for name, v in pairs(stanza.attr) do attr[name] = v; end
		original = st.stanza(stanza.name, attr); -- who wrote to whom, when: no text at all
	else
		original = st.clone(stanza);
	end
	original.attr.from = original.attr.from or origin.full_jid;
	original.attr.xmlns = "jabber:client";
	local text = ("Copy of a %s from %s to %s (policyplug)"):format(stanza.name, tostring(original.attr.from),
		tostring(stanza.attr.to));
	if copy_body == "text" then
		local body, subject = content_of(stanza);
		if subject then text = text .. "\nSubject: " .. subject; end
		if body then text = text .. "\n\n" .. body; end
	end
	local copy = st.message({ from = module.host, to = address, type = "normal", id = "policyplug-copy-" .. new_id() })
		:text_tag("body", text)
		:tag("forwarded", { xmlns = "urn:xmpp:forward:0" })
			:tag("delay", { xmlns = "urn:xmpp:delay", stamp = datetime.datetime() }):up()
			:add_child(original):up();
	module:send(copy);
end

-- Every text a client may show gets the disclaimers: each <body> (every language) and the XHTML-IM body.
local function add_disclaimers(stanza, disclaimers)
	if stanza.name ~= "message" or #disclaimers == 0 then return; end
	local suffix = {};
	for _, disclaimer in ipairs(disclaimers) do suffix[#suffix + 1] = "\n\n" .. tostring(disclaimer); end
	suffix = table.concat(suffix);
	for _, child in ipairs(stanza.tags) do
		if child.name == "body" and is_client_ns(child.attr.xmlns) then
			local text = (child:get_text() or "") .. suffix;
			for i = #child, 1, -1 do child[i] = nil; end -- replace the body's text (and any stray children)
			child.tags = {};
			child:text(text);
		elseif child.name == "html" and child.attr.xmlns == XHTML_IM then
			local xhtml_body = child:get_child("body", "http://www.w3.org/1999/xhtml");
			if xhtml_body then
				for _, disclaimer in ipairs(disclaimers) do
					xhtml_body:tag("p"):text(tostring(disclaimer)):up();
				end
			end
		end
	end
end

-- Hand a stanza back to Prosody's ordinary processing, marked so this module lets it pass.
local function post(origin, stanza)
	passed[stanza] = true;
	if origin.type == "c2s" then
		prosody.core_post_stanza(origin, stanza, true); -- with the pre-events other modules hook
	else
		prosody.core_post_stanza(origin, stanza);
	end
end

-- The fail mode. Returns true when the stanza is to be delivered.
local function fail(origin, stanza, kind, why)
	if stopping then -- the sessions are closing: no bounces, one log line for all of them
		count(fail_mode == "open" and "failed_open" or "failed_closed");
		undecided_while_stopping = undecided_while_stopping + 1;
		if undecided_while_stopping == 1 then
			module:log("info", "Prosody is stopping: stanzas that cannot be decided now (first: %s from %s, %s) are %s"
				.. " (fail mode %s), without a line each", kind, tostring(stanza.attr.from or origin.full_jid), why,
				fail_mode == "open" and "delivered" or "refused", fail_mode);
		end
		return fail_mode == "open";
	end
	if fail_mode == "open" then
		count("failed_open");
		module:log("warn", "no decision for %s from %s (%s): fail open, delivering", kind,
			tostring(stanza.attr.from or origin.full_jid), why);
		return true;
	else
		count("failed_closed");
		module:log("warn", "no decision for %s from %s (%s): fail closed, refusing", kind,
			tostring(stanza.attr.from or origin.full_jid), why);
		-- the service refused the event itself (e.g. an address it cannot parse): say that, not
		-- that it is unavailable
		local invalid = why and why:match("^decision service: (.*)");
		refuse(origin, stanza, invalid and "cannot be decided: " .. invalid or UNAVAILABLE_REASON);
	end
end

-- Apply a decision. Returns true when the (possibly rewritten) stanza is to be delivered.
local function enforce(origin, stanza, decision)
	local verdict = decision.decision;
	local copy_to = value(decision.copy_to);
	if copy_to then
		for _, address in ipairs(copy_to) do archive_copy(origin, stanza, address); end
	end
	if verdict == "deny" then
		refuse(origin, stanza, value(decision.reason) or "not permitted by policy");
		return;
	elseif verdict == "drop" then
		return;
	elseif verdict ~= "allow" and verdict ~= "redirect" then
		error("unknown decision " .. tostring(verdict));
	end
	local disclaimers = value(decision.disclaimers);
	if disclaimers then add_disclaimers(stanza, disclaimers); end
	local redirect_to, route_via = value(decision.redirect_to), value(decision.route_via);
	if verdict == "redirect" and redirect_to then
		stanza.attr.to = redirect_to;
	elseif route_via then
		-- hand the stanza to the gateway/component, telling it where it was going
		stanza:tag("route", { xmlns = NS, to = stanza.attr.to }):up();
		stanza.attr.to = route_via;
	end
	return true;
end

-- Per-session queues: entries settle in any order, and leave in the order they came.
local queues = setmetatable({}, { __mode = "k" });

-- Hand a stanza whose session has gone meanwhile (the client disconnected while its stanza was
-- being decided): Prosody cannot route from a retired session, so it goes from this host. Its
-- broadcast presence is dropped: Prosody announced the session's end itself.
local function post_orphan(stanza)
	if stanza.name == "presence" and not stanza.attr.to then return; end
	module:send(stanza);
end

local function deliver(entry)
	local origin, stanza = entry.origin, entry.stanza;
	local ok, to_post = true, entry.pass;
	if entry.decision then
		ok, to_post = pcall(enforce, origin, stanza, entry.decision);
	elseif not entry.pass then
		ok, to_post = pcall(fail, origin, stanza, entry.kind, entry.why);
	end
	if not ok then
		-- a bug here must neither lose the stanza silently nor deliver what was not allowed
		count("lua_errors");
		module:log("error", "policyplug could not enforce %s on %s: %s",
			entry.decision and tostring(entry.decision.decision) or "a failure", stanza:top_tag(), to_post);
		ok, to_post = pcall(fail, origin, stanza, entry.kind or "stanza", "internal error");
	end
	if ok and to_post then
		local posted, err;
		if origin.destroyed then
			posted, err = pcall(post_orphan, stanza);
		else
			posted, err = pcall(post, origin, stanza);
		end
		if not posted then -- an error in a module that handles delivery: not ours to refuse
			module:log("error", "delivering %s after its decision failed: %s", stanza:top_tag(), err);
		end
	end
end

function flush(origin)
	local queue = queues[origin];
	if not queue or queue.flushing then return; end
	queue.flushing = true;
	while queue.first <= queue.last and queue[queue.first].done do
		local entry = queue[queue.first];
		queue[queue.first] = nil;
		queue.first = queue.first + 1;
		deliver(entry);
	end
	queue.flushing = nil;
	if queue.first > queue.last then queues[origin] = nil; end
end

local function check(event)
	local origin, stanza = event.origin, event.stanza;
	if passed[stanza] then passed[stanza] = nil; return; end -- decided already: let it through
	local kind = kind_of(stanza);
	local queue = queues[origin];
	if not kind or not kinds:contains(kind) then
		if not queue then return; end -- nothing waiting before it: straight through
		kind = nil; -- not decided, but it must not overtake what is waiting
	end
	local body, subject, unreadable;
	if kind then
		body, subject, unreadable = content_of(stanza);
		if unreadable and unreadable_mode == "refuse" then
			-- not asked: the policy would decide on less than the recipient gets
			count("unreadable_refused");
			module:log("info", "refusing %s from %s: content the policy cannot read (%s)", kind,
				tostring(stanza.attr.from or origin.full_jid), unreadable);
			if not queue then
				queue = { first = 1, last = 0 };
				queues[origin] = queue;
			end
			queue.last = queue.last + 1;
			queue[queue.last] = { origin = origin, stanza = stanza, kind = kind, done = true,
				decision = { decision = "deny", reason = "content the policy cannot read: " .. unreadable } };
			flush(origin);
			return true;
		end
	end
	local key, cached;
	if kind and cache_revision then
		local from = stanza.attr.from or origin.full_jid or origin.host or "";
		key = kind .. "\0" .. from .. "\0" .. (stanza.attr.to or jid_util.bare(from) or from);
		cached = cache[key];
		if cached == ALLOW and not queue then
			count("cached");
			return; -- allowed before by this very policy, nothing waiting: straight through
		end
	end
	local request = kind and not cached and event_json(origin, stanza, kind, body, subject, unreadable);
	if not queue then
		queue = { first = 1, last = 0 };
		queues[origin] = queue;
	end
	local entry = { origin = origin, stanza = stanza, kind = kind, pass = kind == nil, done = kind == nil,
		key = key };
	if cached then
		count("cached");
		entry.decision, entry.done = cached, true;
	end
	queue.last = queue.last + 1;
	queue[queue.last] = entry;
	if request then
		local ok, err = pcall(ask, request, entry); -- settles the entry (now or later) and flushes
		if not ok then -- settle it here, or the session's queue would wait for it forever
			count("lua_errors");
			module:log("error", "policyplug could not ask about %s: %s", stanza:top_tag(), err);
			entry.why, entry.done = "internal error", true;
		end
	end
	flush(origin);
	return true; -- taken: delivered (or refused) when its turn comes
end

local function guarded(event)
	local ok, handled = pcall(check, event);
	if ok then return handled; end
	-- a bug here must neither lose the stanza silently nor crash the session
	count("lua_errors");
	module:log("error", "policyplug failed on %s: %s", event.stanza:top_tag(), handled);
	if fail_mode == "open" then return; end
	pcall(refuse, event.origin, event.stanza, UNAVAILABLE_REASON);
	return true;
end

-- From local clients: before routing, on the sender's host.
local function from_client(event)
	if event.origin.type ~= "c2s" then return; end
	return guarded(event);
end

-- From remote servers: on arrival at the recipient's host.
local function from_remote(event)
	if event.origin.type ~= "s2sin" then return; end
	return guarded(event);
end

for _, name in ipairs({ "message", "presence", "iq" }) do
	for _, to_type in ipairs({ "/bare", "/full", "/host" }) do
		module:hook("pre-" .. name .. to_type, from_client, 1000);
		module:hook(name .. to_type, from_remote, 1000);
	end
end

-- login: a client session bound a resource. Waits in the session's runner for the decision.
module:hook("resource-bind", function (event)
	if not kinds:contains("login") then return; end
	local session = event.session;
	local conn = session.conn;
	local port = conn and conn.clientport and tonumber(conn:clientport()) or 0;
	local login = '{"kind":"login","from":' .. quote(session.full_jid) .. ',"to":' .. quote(session.host)
		.. ',"protocol":"xmpp","type":"bind","size":0,"payload":[],"client":{"ip":' .. quote(session.ip or "")
		.. ',"port":' .. port .. ',"secure":' .. (session.secure and "true" or "false") .. "}}";
	local function decided(decision, why)
		local refused_reason;
		if not decision then
			if fail_mode == "open" then
				count("failed_open");
				module:log("warn", "no decision for login of %s (%s): fail open, accepting", session.full_jid, why);
			else
				count("failed_closed");
				module:log("warn", "no decision for login of %s (%s): fail closed, refusing", session.full_jid, why);
				refused_reason = UNAVAILABLE_REASON;
			end
		elseif decision.decision == "deny" or decision.decision == "drop" then
			refused_reason = value(decision.reason) or "login not permitted by policy";
			module:log("info", "login of %s refused by policy: %s", session.full_jid, refused_reason);
		end
		if refused_reason and not session.destroyed then
			session:close({ condition = "policy-violation", text = refused_reason });
		end
	end
	local ok, err = pcall(function ()
		if async.ready() then
			local wait, done = async.waiter();
			local decision, why;
			ask(login, function (d, w) decision, why = d, w; done(); end);
			wait();
			decided(decision, why);
		else
			ask(login, decided); -- not in a runner (should not happen): close later if refused
		end
	end);
	if not ok then
		count("lua_errors");
		module:log("error", "policyplug failed deciding the login of %s: %s", session.full_jid, err);
		decided(nil, "internal error");
	end
end, 1000);
