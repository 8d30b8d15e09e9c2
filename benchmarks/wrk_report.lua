-- wrk script used by benchmarks.load: optional path rotation and a JSON summary.
--
-- L7FP_BENCH_PATHS (comma-separated) makes every thread cycle through those
-- paths, so a policy-mix scenario spreads requests evenly over its routes.
-- done() prints one line "L7FP-JSON {...}" with wrk's own histogram read out:
-- percentiles for the report and a CDF (many percentiles) for the plots.

local paths = {}
local env = os.getenv("L7FP_BENCH_PATHS")
if env and #env > 0 then
  for p in string.gmatch(env, "[^,]+") do table.insert(paths, p) end
end
local counter = 0

if #paths > 0 then
  request = function()
    counter = counter + 1
    return wrk.format("GET", paths[(counter % #paths) + 1])
  end
end

local cdf_points = {1, 5, 10, 20, 30, 40, 50, 60, 70, 75, 80, 85, 90, 92.5, 95, 97.5,
                    98, 99, 99.5, 99.9, 99.99}

done = function(summary, latency, requests)
  local e = summary.errors
  local parts = {}
  table.insert(parts, string.format('"requests": %d', summary.requests))
  table.insert(parts, string.format('"duration_us": %d', summary.duration))
  table.insert(parts, string.format('"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}',
                                    e.connect, e.read, e.write, e.status, e.timeout))
  table.insert(parts, string.format('"min_us": %d, "max_us": %d, "mean_us": %.2f',
                                    latency.min, latency.max, latency.mean))
  local cdf = {}
  for _, p in ipairs(cdf_points) do
    table.insert(cdf, string.format('[%g, %d]', p, latency:percentile(p)))
  end
  table.insert(parts, '"cdf": [' .. table.concat(cdf, ", ") .. ']')
  io.write("L7FP-JSON {" .. table.concat(parts, ", ") .. "}\n")
end
