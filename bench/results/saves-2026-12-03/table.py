import json,glob,os,re,sys
d=sys.argv[1]
rows=[]
for f in sorted(glob.glob(d+'/store-*.json')):
    name=os.path.basename(f)[:-5]
    try: j=json.load(open(f))
    except Exception as e: print(name,'bad',e); continue
    meta=open(f[:-5]+'.meta').read()
    la=re.findall(r'loadavg: (\S+)',meta)
    st=re.search(r'start: (\S+)',meta).group(1)[11:19]
    rows.append((st,name,j,la))
rows.sort()
print('| run | start (UTC) | load (start, end) | save GB/s | save rounds GB/s (median [min, max]) | fio sweep best write | save / best | fio best-write job next to each save | save / it (median [min, max]) | fio durable fresh | fio durable overwrite | restore / best read | recovery ms |')
print('|---|---|---|---|---|---|---|---|---|---|---|---|---|')
def sp(s):
    if not s or not s.get('n'): return ''
    return '%.2f [%.2f, %.2f]'%(s['median'],s['min'],s['max'])
for st,name,j,la in rows:
    print('| %s | %s | %s, %s | %.2f | %s | %.2f | %.2f | %s | %s | %s | %s | %.2f | %.0f |'%(name,st,la[0],la[1] if len(la)>1 else '',j['save_gbps'],sp(j.get('save_gbps_spread')),j['fio_best_write_gbps'],j['save_vs_best'],
      sp(j.get('fio_best_write_gbps_spread')),sp(j.get('save_vs_best_interleaved')),sp(j.get('fio_durable_write_gbps_spread')),sp(j.get('fio_durable_overwrite_gbps_spread')),j['restore_vs_best'],j['recovery_ms']))
print()
print('| run | round | save GB/s | wall ms | writes in flight ms | idle ms | segment creates/grows, ms | fdatasyncs, ms | index commits, ms | mean write ms | copy ms (sum) | close ms (sum) |')
print('|---|---|---|---|---|---|---|---|---|---|---|---|')
for st,name,j,la in rows:
    for i,r in enumerate(j.get('save_rounds') or []):
        print('| %s | %d | %.2f | %.0f | %.0f | %.0f | %d, %.0f | %d, %.0f | %d, %.0f | %.1f | %.0f | %.0f |'%(name,i,r['gbps'],r['wall_ms'],r['busy_ms'],r['idle_ms'],r['segment_files'],r['segment_ms_total'],r['syncs'],r['sync_ms_total'],r['commits'],r['index_ms_total'],r['write_ms_mean'],r['copy_ms_sum'],r['close_ms_sum']))
    if not j.get('save_rounds'):
        print('| %s | - | %.2f | %.0f | | | | %d, %.0f | %d, %.0f | %.1f | | |'%(name,j['save_gbps'],j['save_wall_ms'],j['save_syncs'],j['save_sync_ms_total'],j['save_commits'],j['save_index_ms_total'],j['save_write_ms_mean']))
