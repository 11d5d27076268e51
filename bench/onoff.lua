-- wrk script: POST Onoff-shaped SMS events, each with a unique id (thread, counter).
-- Usage: wrk -s bench/onoff.lua -H "Authorization: x-api-key KEY" URL/v1/onoff/sms
local counter = 0
local thread_id = 0
local threads = {}

function setup(thread)
  thread:set("thread_id", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  math.randomseed(os.time() + thread_id)
  prefix = string.format("%08x-%04x", math.random(0, 0x7fffffff), thread_id)
end

local template = '{"id":"%s-%012d","eventName":"SMS","onoffUserName":"John Doe",'
  .. '"onoffUserEmail":"john.doe@example.com","onoffUserNumber":"+33612345678",'
  .. '"externalNumber":"+33698765432","externalName":"John Smith",'
  .. '"externalEmail":"smith@example.com","date":"2023-05-20T14:30:00Z",'
  .. '"smsDirection":"SENT","body":"This is the body of the SMS, about as long as a typical '
  .. 'message people send to each other during a working day."}'

function request()
  counter = counter + 1
  local body = string.format(template, prefix, counter)
  -- wrk.format replaces wrk.headers when given headers: pass the -H ones along.
  local headers = {["Content-Type"] = "application/json"}
  for name, value in pairs(wrk.headers) do headers[name] = value end
  return wrk.format("POST", nil, headers, body)
end

function done(summary, latency, requests)
  local non200 = summary.errors.status
  io.write(string.format("JSON {\"requests\":%d,\"duration_us\":%d,\"non_2xx\":%d,"
    .. "\"socket_errors\":%d,\"p50_ms\":%.3f,\"p99_ms\":%.3f,\"p999_ms\":%.3f}\n",
    summary.requests, summary.duration, non200,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    latency:percentile(99.9) / 1000))
end
