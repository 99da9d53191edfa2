// Package par runs independent pieces of work on every core.
package par

import (
	"runtime"
	"sync"
)

// Each runs fn(0), ..., fn(n-1), at most GOMAXPROCS at a time, and returns
// when all have returned. fn must be safe to call concurrently.
func Each(n int, fn func(i int)) {
	var wg sync.WaitGroup
	sem := make(chan struct{}, runtime.GOMAXPROCS(0))
	for i := 0; i < n; i++ {
		wg.Add(1)
		sem <- struct{}{}
		go func(i int) {
			defer wg.Done()
			defer func() { <-sem }()
			fn(i)
		}(i)
	}
	wg.Wait()
}
