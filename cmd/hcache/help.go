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
		"ls":             "hcache ls --dir /var/lib/hcache --ns tenant1   # or --addr unix:///run/hcache.sock",
		"rm":             "hcache rm --addr unix:///run/hcache.sock --ns tenant1 --id conv-42",
		"pin":            "hcache pin --dir /var/lib/hcache --ns tenant1 --id system-prompt   # --unpin to lift it",
		"gc":             "hcache gc --dir /var/lib/hcache --json",
		"bench daemon":   "hcache bench daemon --dir /mnt/nvme/tmp --model llama2-7b --tokens 4096 --clients 1,4,16",
		"bench pipeline": "hcache bench pipeline --dir /mnt/nvme/tmp --model llama2-7b --tokens 4096 --json",
		"plan":           "hcache plan --model llama2-7b --tokens 4096 --profile profile.json",
		"profile":        "hcache profile --dir /mnt/nvme/tmp --model demo-llama --out profile.json",
		"simulate":       "hcache simulate --model llama2-7b --profile profile.json --seed 1 --json",
		"gpu ipc-child":  "hcache gpu ipc-child --handle HEX --koff K0,K1 --voff V0,V1 --blocks N   # started by gpu check",
	} {
		if examples[name] == "" {
			examples[name] = ex
		}
	}
}
