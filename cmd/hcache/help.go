package main

// One example per command, shown by `hcache COMMAND -h` (commands added in
// their own files set theirs in their init).
func init() {
	for name, ex := range map[string]string{
		"bench io":       "hcache bench io --dir /mnt/nvme/tmp --size 4G --bs 1M --qd 8",
		"bench store":    "hcache bench store --dir /mnt/nvme/tmp --model llama2-7b --tokens 4096 --contexts 16",
		"crashtest":      "hcache crashtest --cycles 10 --ops 200 --kill 50 --json",
		"stress":         "hcache stress --dir /tmp/crashstore --seed 1   # run by crashtest; prints each acknowledgement",
		"demo":           "hcache demo --model tiny-llama --turns 3",
		"model synth":    "hcache model synth --config tiny-llama --seed 1 --out /tmp/tiny",
		"gpu check":      "hcache gpu check --tokens 200 --json",
		"bench gpu":      "hcache bench gpu --model llama2-7b --tokens 1024,4096,16384 --json",
		"gpu ipc-child":  "hcache gpu ipc-child --handle HEX --koff K0,K1 --voff V0,V1 --blocks N   # started by gpu check",
		"ls":             "hcache ls --addr unix:///run/hcache/hcache.sock --ns chat   # or --dir D when no daemon runs",
		"rm":             "hcache rm --addr unix:///run/hcache/hcache.sock --ns chat --id conv-42",
		"pin":            "hcache pin --addr unix:///run/hcache/hcache.sock --ns chat --id system-prompt",
		"gc":             "hcache gc --dir /var/lib/hcache",
		"plan":           "hcache plan --profile a100-pm9a3x4 --model llama2-7b --tokens 4096",
		"profile":        "hcache profile --dir /mnt/nvme/tmp --model tiny-llama --json --out profiles/this-machine.json",
		"simulate":       "hcache simulate --profile a100-pm9a3x4 --model llama2-7b --workload chat --json",
		"bench daemon":   "hcache bench daemon --json",
		"bench pipeline": "hcache bench pipeline --json",
		"bench compare":  "hcache bench compare --dir /mnt/nvme/tmp --model llama2-7b --workload chat --out bench/results",
	} {
		if examples[name] == "" {
			examples[name] = ex
		}
	}
}
