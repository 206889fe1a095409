-- wrk script: entitlement lookups of the bench shops.
--
--   wrk ... URL -- WORKLOAD SHOPS HOT
--
-- WORKLOAD "hot" asks for HOT shops spread evenly over all of them, "cold" for
-- any of the SHOPS shops at random. Ids are built exactly as shop_id() in
-- shops.py builds them. At the end one line starting with "BENCH " carries the
-- figures as JSON for bench.py.

local workload, shops, hot = "hot", 100000, 100

local function shop_id(index)
  local scrambled = (index * 73244475) % 4294967296
  return string.format("%08x-b3c4-4d5e-8f60-%012x", scrambled, index)
end

function init(args)
  workload = args[1] or workload
  shops = tonumber(args[2]) or shops
  hot = math.min(tonumber(args[3]) or hot, shops)
  math.randomseed(os.time())
end

function request()
  local index
  if workload == "hot" then
    index = math.floor(math.random(0, hot - 1) * shops / hot)
  else
    index = math.random(0, shops - 1)
  end
  return wrk.format("GET", "/entitlement/" .. shop_id(index))
end

function done(summary, latency, requests)
  local errors = summary.errors
  local failed = errors.connect + errors.read + errors.write + errors.status
    + errors.timeout
  io.write(string.format(
    'BENCH {"requests": %d, "duration_us": %d, "errors": %d,'
      .. ' "p50_us": %.1f, "p99_us": %.1f}\n',
    summary.requests, summary.duration, failed,
    latency:percentile(50), latency:percentile(99)))
end
