-- luacheck: globals module prosody
-- policyplug_transport.lib.lua, part of mod_policyplug (module:require "policyplug_transport"):
-- asking the decision service over its Unix socket or its XEP-0114 component, the timeouts, and
-- the decision cache. Called with the module's shared table P (options, count, value; it sets
-- P.stopping, and calls P.flush, which policyplug_enforce provides, when an entry is settled).

local st = require "util.stanza";
local json = require "util.json";
local async = require "util.async";
local time_now = require "util.time".now;

return function (P)
local NS, ALLOW, DROP, timeout = P.NS, P.ALLOW, P.DROP, P.timeout;
local socket_path, service_jid, use_cache, fail_mode = P.socket_path, P.service_jid, P.use_cache, P.fail_mode;
local count, value = P.count, P.value;

------------------------------------------------------------------------------------------------
-- Transport: ask(request_json, waiter) settles the waiter exactly once, with a decision or with
-- nil and why. A waiter is a queue entry (see check) or, for logins, a function.
------------------------------------------------------------------------------------------------

local pending = {};               -- request id -> waiter
-- Prosody is stopping: sessions close and send their last presences. The transport stays up until
-- "server-cleanup" (after the sessions have closed), so those are decided as usual; what cannot be
-- decided meanwhile is handled by the fail mode and logged once, not once per stanza.
local drained; -- while Prosody waits for the last decisions: called when none is pending
local close_transport;            -- transport-specific, at "server-cleanup"
module:hook_global("server-stopping", function () P.stopping = true; end, 1000);
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
		ok, lua_err = pcall(P.flush, waiter.origin); -- the queue's (policyplug_enforce)
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
		if P.stopping then
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
			if not reconnect_timer and not P.stopping then
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
	function module.unload() P.stopping = true; if conn then conn:close(); end end
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

return {
	ask = ask,
	caching = function () return cache_revision ~= nil; end, -- decisions of the policy in force are cached
	lookup = function (key) return cache[key]; end,
};
end
