package main

// Examples of the scheduler's commands (shown by -h).
func init() {
	examples["profile"] = "hcache profile --dir /mnt/nvme/tmp --model demo-llama --json --out /tmp/this-machine.json"
	examples["bench pipeline"] = "hcache bench pipeline --json   # ratio 1.0 = I/O fully hidden under compute"
	examples["simulate"] = "hcache simulate --profile a100-pm9a3x4 --model llama2-7b --workload chat --json"
	examples["plan"] = "hcache plan --profile h200-nvme --model llama3-8b --tokens 8192"
}
