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
-- Files (module:require, as prosody-modules' mod_firewall does; keep them together in one folder
-- of plugin_paths):
--   mod_policyplug.lua               options, counters, the hooks
--   policyplug_transport.lib.lua     asking the service (socket or component), timeouts, the cache
--   policyplug_event.lib.lua         what a stanza is: kind, content (body, subject); the event JSON
--                                    of stanzas and logins
--   policyplug_enforce.lib.lua       per-session queues, enforcing decisions and the fail mode, logins
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

local json = require "util.json";

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

-- Shared by the parts: options, counters; P.stopping (set when Prosody stops) and P.flush (the
-- queues') are filled in by the transport and the enforcement.
local P = { NS = NS, ALLOW = ALLOW, DROP = DROP, socket_path = socket_path, service_jid = service_jid,
	timeout = timeout, fail_mode = fail_mode, kinds = kinds, use_cache = use_cache,
	unreadable_mode = unreadable_mode, copy_body = copy_body, UNAVAILABLE_REASON = UNAVAILABLE_REASON,
	count = count, value = value, stopping = false };
local events_lib = module:require("policyplug_event");
local transport = module:require("policyplug_transport")(P);
local enforcement = module:require("policyplug_enforce")(P, events_lib, transport);
module.content_of = events_lib.content_of; -- for tests (tests/prosody_content_harness.lua)

for _, name in ipairs({ "message", "presence", "iq" }) do
	for _, to_type in ipairs({ "/bare", "/full", "/host" }) do
		module:hook("pre-" .. name .. to_type, enforcement.from_client, 1000);
		module:hook(name .. to_type, enforcement.from_remote, 1000);
	end
end

-- logins: a client session bound a resource; decided before anything else of the session is processed
module:hook("resource-bind", enforcement.login, 1000);
