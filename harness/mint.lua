-- wrk script: POST /v1/mint-oidc-jwt, rotating over the session tokens in
-- $TOKENS (one per line), and report mints/s, latency percentiles and every
-- answer by status and error code.

local threads = {}
local next_id = 0

function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

function init(args)
  requests = {}
  local body = os.getenv("MINT_BODY") or "{}"
  for token in io.lines(os.getenv("TOKENS")) do
    local headers = { ["Authorization"] = "Bearer " .. token, ["Content-Type"] = "application/json" }
    table.insert(requests, wrk.format("POST", nil, headers, body))
  end
  index = id
  codes = {}
end

-- $PACE_MS: each connection waits this long between its answer and its next
-- request, which holds the offered rate below the peak (wrk measures only the
-- request's own latency).
local pace = tonumber(os.getenv("PACE_MS") or "0")

function delay()
  return pace
end

function request()
  index = index % #requests + 1
  return requests[index]
end

function response(status, headers, body)
  local key = tostring(status)
  if status ~= 200 then
    key = key .. " " .. (string.match(body, '"error":"([%w_]+)"') or "?")
  end
  codes[key] = (codes[key] or 0) + 1
end

function done(summary, latency, requests)
  local total = {}
  for _, thread in ipairs(threads) do
    for key, count in pairs(thread:get("codes")) do
      total[key] = (total[key] or 0) + count
    end
  end
  local seconds = summary.duration / 1e6
  io.write(string.format("mints/s (200 only): %.0f\n", (total["200"] or 0) / seconds))
  for _, p in ipairs({ 50, 90, 99 }) do
    io.write(string.format("latency p%d: %.2f ms\n", p, latency:percentile(p) / 1000))
  end
  for key, count in pairs(total) do
    io.write(string.format("answers %s: %d\n", key, count))
  end
end
