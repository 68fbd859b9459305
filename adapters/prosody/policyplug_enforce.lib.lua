-- luacheck: globals module prosody
-- policyplug_enforce.lib.lua, part of mod_policyplug (module:require "policyplug_enforce"): the
-- per-session queues that keep a sender's stanzas in order while they are decided, what each
-- decision (or the fail mode) does to a stanza, and logins (decided before the session goes on).
-- Called with the module's shared table P, the event functions (policyplug_event) and the
-- transport (policyplug_transport); sets P.flush.

local st = require "util.stanza";
local jid_util = require "util.jid";
local datetime = require "util.datetime";
local new_id = require "util.id".short;
local async = require "util.async";

return function (P, events_lib, transport)
local NS, ALLOW, UNAVAILABLE_REASON = P.NS, P.ALLOW, P.UNAVAILABLE_REASON;
local fail_mode, kinds, unreadable_mode, copy_body = P.fail_mode, P.kinds, P.unreadable_mode, P.copy_body;
local count, value = P.count, P.value;
local content_of, event_json, kind_of = events_lib.content_of, events_lib.event_json, events_lib.kind_of;
local login_json = events_lib.login_json;
local SUBSCRIPTION_TYPES, is_client_ns = events_lib.SUBSCRIPTION_TYPES, events_lib.is_client_ns;
local XHTML_IM = events_lib.XHTML_IM;
local ask = transport.ask;
local undecided_while_stopping = 0; -- stanzas the fail mode handled while Prosody stops

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

-- The fail mode, for whatever the service did not decide (what: "message from ...", "login of
-- ..."; passing: the word for letting it through). Counted and logged, once a line, or once in all
-- while Prosody stops. Returns true when it goes through; else false and the reason to give.
local function fail_mode_verdict(what, why, passing)
	if P.stopping then -- the sessions are closing: one log line for all of them
		count(fail_mode == "open" and "failed_open" or "failed_closed");
		undecided_while_stopping = undecided_while_stopping + 1;
		if undecided_while_stopping == 1 then
			module:log("info", "Prosody is stopping: stanzas that cannot be decided now (first: %s, %s) are %s"
				.. " (fail mode %s), without a line each", what, why,
				fail_mode == "open" and "delivered" or "refused", fail_mode);
		end
	elseif fail_mode == "open" then
		count("failed_open");
		module:log("warn", "no decision for %s (%s): fail open, %s", what, why, passing);
	else
		count("failed_closed");
		module:log("warn", "no decision for %s (%s): fail closed, refusing", what, why);
	end
	if fail_mode == "open" then return true; end
	-- the service refused the event itself (e.g. an address it cannot parse): say that, not
	-- that it is unavailable
	local invalid = why and why:match("^decision service: (.*)");
	return false, invalid and "cannot be decided: " .. invalid or UNAVAILABLE_REASON;
end

-- The fail mode for a stanza. Returns true when it is to be delivered.
local function fail(origin, stanza, kind, why)
	local from = tostring(stanza.attr.from or origin.full_jid);
	local deliver, reason = fail_mode_verdict(kind .. " from " .. from, why, "delivering");
	if deliver then return true; end
	if not P.stopping then refuse(origin, stanza, reason); end -- no bounces to sessions that are closing
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

local function flush(origin)
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
	if kind and transport.caching() then
		local from = stanza.attr.from or origin.full_jid or origin.host or "";
		key = kind .. "\0" .. from .. "\0" .. (stanza.attr.to or jid_util.bare(from) or from);
		cached = transport.lookup(key);
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

-- Logins (resource bind): decided inside the session's async runner, so nothing of the session
-- is processed before its login is decided; a refused login closes the session.
local function login_decided(session, decision, why)
	local refused_reason;
	if not decision then
		local accepted, reason = fail_mode_verdict("login of " .. tostring(session.full_jid), why, "accepting");
		if not accepted then refused_reason = reason; end
	elseif decision.decision == "deny" or decision.decision == "drop" then
		refused_reason = value(decision.reason) or "login not permitted by policy";
		module:log("info", "login of %s refused by policy: %s", session.full_jid, refused_reason);
	end
	if refused_reason and not session.destroyed then
		session:close({ condition = "policy-violation", text = refused_reason });
	end
end

local function login(event)
	if not kinds:contains("login") then return; end
	local session = event.session;
	local ok, err = pcall(function ()
		local request = login_json(session);
		if async.ready() then
			local wait, done = async.waiter();
			local decision, why;
			ask(request, function (d, w) decision, why = d, w; done(); end);
			wait();
			login_decided(session, decision, why);
		else -- not in a runner (should not happen): closed later if refused
			ask(request, function (d, w) login_decided(session, d, w); end);
		end
	end);
	if not ok then
		count("lua_errors");
		module:log("error", "policyplug failed deciding the login of %s: %s", tostring(session.full_jid), err);
		login_decided(session, nil, "internal error");
	end
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

P.flush = flush;
return { from_client = from_client, from_remote = from_remote, login = login };
end
