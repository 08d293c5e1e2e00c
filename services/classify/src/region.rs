//! Where a problem is: province and city named in the text (or the gateway's hint), for
//! routing to regional branches. Matches on Simplified text (fold Traditional first).

/// Provincial-level divisions, with their larger cities.
const REGIONS: &[(&str, &[&str])] = &[
    ("北京", &["北京"]),
    ("天津", &["天津"]),
    ("上海", &["上海"]),
    ("重庆", &["重庆"]),
    (
        "河北",
        &["石家庄", "唐山", "保定", "邯郸", "秦皇岛", "廊坊", "沧州"],
    ),
    ("山西", &["太原", "大同", "运城", "长治"]),
    ("内蒙古", &["呼和浩特", "包头", "鄂尔多斯", "赤峰"]),
    ("辽宁", &["沈阳", "大连", "鞍山", "锦州"]),
    ("吉林", &["长春", "吉林市", "延边"]),
    ("黑龙江", &["哈尔滨", "大庆", "齐齐哈尔", "牡丹江"]),
    ("江苏", &["南京", "苏州", "无锡", "常州", "徐州", "南通", "扬州"]),
    ("浙江", &["杭州", "宁波", "温州", "绍兴", "嘉兴", "金华", "台州"]),
    ("安徽", &["合肥", "芜湖", "蚌埠", "阜阳"]),
    ("福建", &["福州", "厦门", "泉州", "漳州"]),
    ("江西", &["南昌", "赣州", "九江"]),
    ("山东", &["济南", "青岛", "烟台", "潍坊", "临沂", "淄博", "威海"]),
    ("河南", &["郑州", "洛阳", "开封", "南阳", "新乡"]),
    ("湖北", &["武汉", "宜昌", "襄阳", "荆州"]),
    ("湖南", &["长沙", "株洲", "湘潭", "衡阳", "岳阳"]),
    (
        "广东",
        &[
            "广州", "深圳", "东莞", "佛山", "珠海", "汕头", "惠州", "中山", "江门",
        ],
    ),
    ("广西", &["南宁", "桂林", "柳州", "北海"]),
    ("海南", &["海口", "三亚"]),
    ("四川", &["成都", "绵阳", "宜宾", "南充", "乐山"]),
    ("贵州", &["贵阳", "遵义"]),
    ("云南", &["昆明", "大理", "丽江", "曲靖"]),
    ("西藏", &["拉萨"]),
    ("陕西", &["西安", "宝鸡", "咸阳", "延安"]),
    ("甘肃", &["兰州", "天水"]),
    ("青海", &["西宁"]),
    ("宁夏", &["银川"]),
    ("新疆", &["乌鲁木齐", "喀什", "克拉玛依"]),
    ("香港", &["香港"]),
    ("澳门", &["澳门"]),
    ("台湾", &["台北", "高雄", "台中"]),
];

/// One automaton over every city and province name, with what each pattern names.
struct Places {
    automaton: aho_corasick::AhoCorasick,
    /// (province, city or "" for a province name) per pattern.
    names: Vec<(&'static str, &'static str)>,
}

static PLACES: std::sync::LazyLock<Option<Places>> = std::sync::LazyLock::new(|| {
    let mut names = Vec::new();
    for (province, cities) in REGIONS {
        names.extend(cities.iter().map(|city| (*province, *city)));
        names.push((*province, ""));
    }
    let patterns = names
        .iter()
        .map(|(province, city)| if city.is_empty() { *province } else { *city });
    // A DFA, as for the keywords: every text classified is scanned with it.
    aho_corasick::AhoCorasick::builder()
        .kind(Some(aho_corasick::AhoCorasickKind::DFA))
        .build(patterns)
        .ok()
        .map(|automaton| Places { automaton, names })
});

/// (province, city) named in `text`; either may be empty. The first city mentioned wins,
/// and implies its province; without a city, the first province mentioned.
pub fn locate(text: &str) -> (String, String) {
    let Some(places) = PLACES.as_ref() else {
        return (String::new(), String::new());
    };
    let mut province_only: Option<&str> = None;
    for hit in places.automaton.find_overlapping_iter(text) {
        let (province, city) = places.names[hit.pattern().as_usize()];
        if !city.is_empty() {
            return (province.to_owned(), city.trim_end_matches('市').to_owned());
        }
        province_only.get_or_insert(province);
    }
    (province_only.unwrap_or_default().to_owned(), String::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_city_implies_its_province() {
        assert_eq!(locate("深圳南山区停电两小时"), ("广东".into(), "深圳".into()));
        assert_eq!(locate("北京朝阳区宽带断了"), ("北京".into(), "北京".into()));
        assert_eq!(locate("吉林市的营业厅"), ("吉林".into(), "吉林".into()));
    }

    #[test]
    fn a_province_alone_and_nothing_at_all() {
        assert_eq!(locate("我在四川老家，信号很差"), ("四川".into(), String::new()));
        assert_eq!(locate("信号很差"), (String::new(), String::new()));
    }

    #[test]
    fn the_first_mention_wins() {
        assert_eq!(locate("从杭州寄到广州的快递丢了"), ("浙江".into(), "杭州".into()));
    }
}
