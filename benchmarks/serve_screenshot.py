"""docs/serving_page.png: the page of a running server, after classifying one image, in
headless Chromium (Debian's chromium + chromium-driver, driven by selenium).

  python benchmarks/serve_screenshot.py --port 8000 --adapter digits_af --image 7.png \
      [--out docs/serving_page.png]
"""
import argparse

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM, CHROMEDRIVER = '/usr/bin/chromium', '/usr/bin/chromedriver'  # Debian's packages


def chromium(width: int = 900, height: int = 700) -> webdriver.Chrome:
  """A headless Chromium session (no download: the Debian driver and browser)."""
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for arg in ('--headless=new', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage',
              f'--window-size={width},{height}'):
    options.add_argument(arg)
  return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))


def classify_on_page(driver: webdriver.Chrome, url: str, adapter: str, image: str,
                     adapters: int) -> None:
  """Opens the page, picks `adapter`, chooses `image` and waits for its bars."""
  driver.get(url)
  wait = WebDriverWait(driver, 60)
  wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, '#adapter option')) == adapters)
  Select(driver.find_element(By.ID, 'adapter')).select_by_value(adapter)
  driver.find_element(By.ID, 'file').send_keys(image)
  wait.until(lambda d: 'latency' in d.find_element(By.ID, 'latency').text
             or d.find_element(By.ID, 'error').text)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--port', type=int, default=8000)
  parser.add_argument('--adapter', required=True)
  parser.add_argument('--adapters', type=int, required=True, help='how many the server has')
  parser.add_argument('--image', required=True)
  parser.add_argument('--out', default='docs/serving_page.png')
  args = parser.parse_args()
  driver = chromium(760, 720)
  try:
    classify_on_page(driver, f'http://127.0.0.1:{args.port}/', args.adapter, args.image,
                     args.adapters)
    driver.save_screenshot(args.out)
  finally:
    driver.quit()
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
