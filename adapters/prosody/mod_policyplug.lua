-- mod_policyplug: every message, presence, subscription, IQ, group chat message, room join and
-- login is decided by the policyplug decision service, and the decision is enforced here.
--
-- The decision service is an XEP-0114 component (`policyplug serve --component ...`). For each
-- stanza we send it an IQ carrying the event JSON and wait for the answer inside the session's
-- async runner, so Prosody keeps serving everyone else meanwhile. Stanzas from local clients
-- are checked in the pre-* events on the sender's host; stanzas from remote servers when they
-- arrive (origin type s2sin). Stanzas this module sends itself (bounces, copies) are not checked.
--
-- Options (Prosody config, per host or global):
--   policyplug_component = "policy.example.com"   -- the decision service's component JID
--   policyplug_timeout = 2                         -- seconds to wait for a decision
--   policyplug_fail_mode = "closed"                -- "closed": refuse when no answer; "open": allow
--   policyplug_kinds = { "message", "presence", ... }  -- event kinds to check (default: all)

local st = require "util.stanza";
local jid_util = require "util.jid";
local json = require "util.json";
local async = require "util.async";
local new_id = require "util.id".medium;
local datetime = require "util.datetime";
local array = require "util.array"; -- util.json encodes these as JSON arrays, even when empty

local NS = "urn:policyplug:decision:1";
local service_jid = module:get_option_string("policyplug_component", "policy." .. module.host);
local timeout = module:get_option_number("policyplug_timeout", 2);
local fail_mode = module:get_option_string("policyplug_fail_mode", "closed");
local kinds = module:get_option_set("policyplug_kinds", {
	"message", "groupchat", "presence", "subscribe", "join", "call", "file", "login", "iq" });
local UNAVAILABLE_REASON = "policy service unavailable";

local counters = { asked = 0, failed_closed = 0, failed_open = 0, errors = 0 };
module:log("info", "asking %s, timeout %ss, fail mode %s", service_jid, timeout, fail_mode);

local SUBSCRIPTION_TYPES = { subscribe = true, subscribed = true, unsubscribe = true, unsubscribed = true };

-- What kind of event a stanza is (the rule language's event kinds).
local function kind_of(stanza)
	local name, stype = stanza.name, stanza.attr.type;
	if name == "message" then
		return stype == "groupchat" and "groupchat" or "message";
	elseif name == "presence" then
		if SUBSCRIPTION_TYPES[stype] then return "subscribe"; end
		if stanza:get_child("x", "http://jabber.org/protocol/muc") then return "join"; end
		return "presence";
	elseif name == "iq" then
		if stype ~= "get" and stype ~= "set" then return nil; end -- answers are not decided
		local jingle = stanza:get_child("jingle", "urn:xmpp:jingle:1");
		if jingle then
			local content = jingle:get_child("content");
			local description = content and content.tags[1];
			local ns = description and description.attr.xmlns or "";
			if ns:match("^urn:xmpp:jingle:apps:file%-transfer") then return "file"; end
			if ns == "urn:xmpp:jingle:apps:rtp:1" then return "call"; end
			return "call";
		end
		if stanza:get_child("si", "http://jabber.org/protocol/si")
			or stanza:get_child("request", "urn:xmpp:http:upload:0") then
			return "file";
		end
		return "iq";
	end
end

local function payload_of(stanza)
	local seen, list = {}, array();
	for child in stanza:childtags() do
		local ns = child.attr.xmlns;
		if ns and not seen[ns] then seen[ns] = true; list[#list + 1] = ns; end
	end
	return list;
end

local function event_of(origin, stanza, kind)
	local from = stanza.attr.from or origin.full_jid or origin.host;
	local to = stanza.attr.to or jid_util.bare(from); -- no 'to': addressed to the sender's own account
	return {
		kind = kind, from = from, to = to, protocol = "xmpp",
		body = stanza:get_child_text("body") or "", subject = stanza:get_child_text("subject") or "",
		type = stanza.attr.type or "", size = #tostring(stanza), payload = payload_of(stanza),
		time = datetime.datetime(),
		client = {
			ip = origin.ip or "", port = tonumber(origin.conn and origin.conn.clientport and origin.conn:clientport()) or 0,
			secure = origin.secure and true or false,
		},
	};
end

-- Ask the decision service; nil and a message when it does not answer in time.
local function ask(event)
	if not async.ready() then
		return nil, "not in an async runner";
	end
	local request = st.iq({ type = "get", from = module.host, to = service_jid, id = new_id() })
		:text_tag("decide", json.encode(event), { xmlns = NS });
	counters.asked = counters.asked + 1;
	local result, err = async.wait_for(module:send_iq(request, nil, timeout));
	if not result then
		return nil, tostring(err and (err.text or err.condition) or err);
	end
	local answer = result.stanza:get_child("decision", NS);
	local decision = answer and json.decode(answer:get_text());
	if type(decision) ~= "table" or type(decision.decision) ~= "string" then
		return nil, "malformed answer from the decision service";
	end
	return decision;
end

local function refuse(origin, stanza, reason)
	if stanza.attr.type == "error" or stanza.attr.type == "result" then return; end -- never answer an error
	if stanza.name == "presence" and SUBSCRIPTION_TYPES[stanza.attr.type] then
		if stanza.attr.type == "subscribe" and stanza.attr.to then
			-- the matching refusal of a subscription request
			local refusal = st.presence({ type = "unsubscribed", from = jid_util.bare(stanza.attr.to),
				to = jid_util.bare(stanza.attr.from or origin.full_jid), id = stanza.attr.id })
				:text_tag("status", reason);
			if origin.type == "c2s" then origin.send(refusal); else module:send(refusal); end
		end
		return;
	end
	local reply = st.error_reply(stanza, "modify", "policy-violation", reason);
	if origin.type == "c2s" then
		if not reply.attr.to then reply.attr.to = origin.full_jid; end
		origin.send(reply);
	else
		module:send(reply);
	end
end

local function archive_copy(stanza, address)
	-- a short body first: clients that do not render XEP-0297 still show what this is
	local copy = st.message({ from = module.host, to = address, type = "normal", id = new_id() })
		:text_tag("body", ("Copy of a %s from %s to %s (policyplug)"):format(stanza.name,
			tostring(stanza.attr.from), tostring(stanza.attr.to)))
		:tag("forwarded", { xmlns = "urn:xmpp:forward:0" })
			:tag("delay", { xmlns = "urn:xmpp:delay", stamp = datetime.datetime() }):up()
			:add_child(st.clone(stanza)):up();
	module:send(copy);
end

local function add_disclaimers(stanza, disclaimers)
	if stanza.name ~= "message" or #disclaimers == 0 then return; end
	local body = stanza:get_child("body");
	if not body then return; end
	local text = body:get_text() or "";
	for _, disclaimer in ipairs(disclaimers) do text = text .. "\n\n" .. disclaimer; end
	-- replace the body's text node
	for i = #body, 1, -1 do body[i] = nil; end
	body:text(text);
end

-- Enforce a decision. Returns true when the stanza was handled here (stop Prosody's processing).
local function enforce(origin, stanza, decision)
	local verdict = decision.decision;
	if verdict == "deny" then
		refuse(origin, stanza, decision.reason or "not permitted by policy");
		return true;
	elseif verdict == "drop" then
		return true;
	end
	for _, address in ipairs(decision.copy_to or {}) do archive_copy(stanza, address); end
	add_disclaimers(stanza, decision.disclaimers or {});
	if verdict == "redirect" and decision.redirect_to then
		stanza.attr.to = decision.redirect_to;
		module:send(stanza, origin);
		return true;
	end
	if decision.route_via and decision.route_via ~= json.null then
		-- hand the stanza to the gateway/component, telling it where it was going
		local original_to = stanza.attr.to;
		stanza:tag("route", { xmlns = NS, to = original_to }):up();
		stanza.attr.to = decision.route_via;
		module:send(stanza, origin);
		return true;
	end
	return nil; -- allow: Prosody delivers as usual
end

local function check(event)
	local origin, stanza = event.origin, event.stanza;
	local kind = kind_of(stanza);
	if not kind or not kinds:contains(kind) then return; end
	local ok, decision, err = pcall(ask, event_of(origin, stanza, kind));
	if not ok then
		counters.errors = counters.errors + 1;
		decision, err = nil, decision;
	end
	if not decision then
		if fail_mode == "open" then
			counters.failed_open = counters.failed_open + 1;
			module:log("warn", "no decision for %s (%s): fail open, delivering", kind, err);
			return;
		end
		counters.failed_closed = counters.failed_closed + 1;
		module:log("warn", "no decision for %s (%s): fail closed, refusing", kind, err);
		refuse(origin, stanza, UNAVAILABLE_REASON);
		return true;
	end
	local handled_ok, handled = pcall(enforce, origin, stanza, decision);
	if not handled_ok then
		counters.errors = counters.errors + 1;
		module:log("error", "enforcing %s failed: %s", decision.decision, handled);
		if fail_mode ~= "open" then refuse(origin, stanza, UNAVAILABLE_REASON); return true; end
		return;
	end
	return handled;
end

-- From local clients: before routing, on the sender's host.
local function from_client(event)
	if event.origin.type ~= "c2s" then return; end
	return check(event);
end

-- From remote servers: on arrival at the recipient's host.
local function from_remote(event)
	if event.origin.type ~= "s2sin" then return; end
	return check(event);
end

for _, name in ipairs({ "message", "presence", "iq" }) do
	for _, to_type in ipairs({ "bare", "full", "host" }) do
		module:hook("pre-" .. name .. "/" .. to_type, from_client, 1000);
		module:hook(name .. "/" .. to_type, from_remote, 1000);
	end
end

-- login: a client session bound a resource
module:hook("resource-bind", function (event)
	if not kinds:contains("login") then return; end
	local session = event.session;
	local login = {
		kind = "login", from = session.full_jid, to = session.host, protocol = "xmpp", body = "", subject = "",
		type = "bind", size = 0, payload = array(), time = datetime.datetime(),
		client = { ip = session.ip or "", port = 0, secure = session.secure and true or false },
	};
	local ok, decision, err = pcall(ask, login);
	if not ok then decision, err = nil, decision; end
	local refused_reason;
	if not decision then
		if fail_mode ~= "open" then refused_reason = UNAVAILABLE_REASON; end
		module:log("warn", "no decision for login of %s (%s)", session.full_jid, err);
	elseif decision.decision == "deny" or decision.decision == "drop" then
		refused_reason = decision.reason or "login not permitted by policy";
	end
	if refused_reason then
		session:close({ condition = "policy-violation", text = refused_reason });
	end
end, 1000);

-- counters for operators: `prosodyctl shell` -> `> require"core.modulemanager".get_module(host, "policyplug").counters`
module.counters = counters;
