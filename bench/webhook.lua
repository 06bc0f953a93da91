-- wrk script for bench/webhook.py: signed webhook deliveries, each with its own delivery id.
--
-- wrk's Lua has no HMAC, so bench/webhook.py writes pre-signed requests to a file, one per
-- line: "<signature header>\t<event>\t<body>". Every wrk thread cycles through them and
-- gives each request a delivery id no other request of the run has.
--
--   wrk -t2 -c16 -d10s -s bench/webhook.lua http://127.0.0.1:8080/webhook -- FILE PREFIX

local threads = {}
local counter = 0

function setup(thread)
   thread:set("tid", #threads + 1)
   table.insert(threads, thread)
end

function init(args)
   local path = args[1]
   prefix = args[2] or "bench"
   entries = {}
   for line in io.lines(path) do
      local signature, event, body = line:match("^([^\t]*)\t([^\t]*)\t(.*)$")
      if signature then
         table.insert(entries, { signature = signature, event = event, body = body })
      end
   end
   if #entries == 0 then
      error("no signed requests in " .. path)
   end
   statuses = {}
   tid = tonumber(wrk.thread:get("tid"))
end

function request()
   counter = counter + 1
   local entry = entries[(counter % #entries) + 1]
   local headers = {
      ["Content-Type"] = "application/json",
      ["X-GitHub-Event"] = entry.event,
      ["X-GitHub-Delivery"] = string.format("%s-%d-%d", prefix, tid, counter),
      ["X-Hub-Signature-256"] = entry.signature,
   }
   return wrk.format("POST", wrk.path, headers, entry.body)
end

function response(status, headers, body)
   local key = tostring(status)
   statuses[key] = (statuses[key] or 0) + 1
end

function done(summary, latency, requests)
   local counts = {}
   for _, thread in ipairs(threads) do
      local seen = thread:get("statuses")
      for status, n in pairs(seen) do
         counts[status] = (counts[status] or 0) + n
      end
   end
   local parts = {}
   for status, n in pairs(counts) do
      table.insert(parts, string.format('"%s": %d', status, n))
   end
   io.write(string.format(
      'WRK_RESULT {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, '
         .. '"max_us": %d, "errors": %d, "statuses": {%s}}\n',
      summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
      latency.max,
      summary.errors.connect + summary.errors.read + summary.errors.write
         + summary.errors.status + summary.errors.timeout,
      table.concat(parts, ", ")
   ))
end
