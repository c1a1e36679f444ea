-- wrk reporter for bench/run.sh: one machine-readable line with the request
-- count, errors and latency percentiles (microseconds), so the two wrk
-- processes of a run can be merged exactly enough by bench/report.py.
done = function(summary, latency, requests)
	local e = summary.errors
	local ps = {}
	for p = 1, 99 do
		ps[#ps + 1] = string.format('"%d":%d', p, latency:percentile(p))
	end
	ps[#ps + 1] = string.format('"99.5":%d', latency:percentile(99.5))
	ps[#ps + 1] = string.format('"99.9":%d', latency:percentile(99.9))
	io.write(string.format(
		'XLBBENCH {"requests":%d,"duration_us":%d,"bytes":%d,' ..
		'"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
		'"latency_mean_us":%.1f,"latency_max_us":%d,"latency_pct_us":{%s}}\n',
		summary.requests, summary.duration, summary.bytes,
		e.connect, e.read, e.write, e.status, e.timeout,
		latency.mean, latency.max, table.concat(ps, ",")))
end
